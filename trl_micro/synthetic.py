r"""
Synthetic personalized preferences: M hidden subpopulations that judge the same responses differently.

The generative model:

- A prompt is an everyday request, a template filled with a topic ("How can I sleep better?").
- A response to it has a style s in {0, 1}^A, one bit per style axis (length, formality, structure, caution,
  enthusiasm, examples), and its text is assembled from phrase banks so that every axis is visible in the words.
- Subpopulation m has a weight vector w_m over the axes and utility u_m(s) = w_m . s. It prefers response a over b
  with probability sigmoid((u_m(s_a) - u_m(s_b)) / label_noise); `label_noise=0` gives the deterministic argmax.
- Each row is one comparison by one subpopulation, shown with the subpopulation's context, a natural-language
  description of its taste. Pairs on which the subpopulation is indifferent are never drawn, and a chosen fraction
  of pairs are ones that some other subpopulation would label the other way.

The subpopulations are designed to conflict (concise and casual vs thorough and formal, cautious vs risk-tolerant,
...), so one Bradley-Terry reward cannot fit them all.
"""

from __future__ import annotations

import itertools
import math
import numbers
import random
from dataclasses import dataclass

from datasets import Dataset

AXES = ("length", "formality", "structure", "caution", "enthusiasm", "examples")
"""Style axes; bit 0 / bit 1: short / detailed, casual / formal, prose / bullet list, plain / with a safety note,
neutral / enthusiastic with emoji, no example / with a concrete example."""


@dataclass(frozen=True)
class Subpopulation:
    """A group of raters: what it likes (weights over `AXES`) and how its members describe themselves."""

    name: str
    weights: dict[str, float]
    context: str
    paraphrases: tuple[str, ...]


SUBPOPULATIONS = (
    Subpopulation(
        "busy-engineer",
        {"length": -2.1, "formality": -1.3, "structure": 0.4, "caution": -0.6, "enthusiasm": -0.7, "examples": -0.2},
        "I am a busy engineer; keep answers short and casual.",
        (
            "Software dev here with zero spare time. Quick, laid-back replies please.",
            "Give it to me fast and informal, I'm swamped at work.",
            "No time to read much, so be brief and talk to me like a friend would.",
        ),
    ),
    Subpopulation(
        "professor",
        {"length": 2.2, "formality": 1.6, "structure": -0.6, "caution": 0.3, "enthusiasm": -1.1, "examples": 0.5},
        "I am a university professor; I prefer thorough, formal answers written in full paragraphs.",
        (
            "As an academic, I value complete and carefully worded explanations in proper prose.",
            "Please respond in a scholarly register and cover the subject in depth.",
            "I appreciate comprehensive, polished replies, the way a well-edited essay reads.",
        ),
    ),
    Subpopulation(
        "safety-first-parent",
        {"length": 0.6, "formality": 0.4, "structure": 0.1, "caution": 2.3, "enthusiasm": -0.4, "examples": 0.3},
        "I am a parent who worries about safety; please always mention risks and precautions.",
        (
            "Safety comes first for me and my kids, so flag anything that could go wrong.",
            "Point out warnings and things to be careful about, I'm quite cautious.",
            "I'd rather hear about the dangers up front; tell me what to watch out for.",
        ),
    ),
    Subpopulation(
        "phone-skimmer",
        {"length": -0.7, "formality": 0.1, "structure": 2.4, "caution": -0.3, "enthusiasm": 0.2, "examples": -0.9},
        "I skim everything on my phone; bullet points work best for me.",
        (
            "Lists please, I don't read long paragraphs.",
            "Format things as quick bullets so I can scan them on a small screen.",
            "Dense text loses me; break your answer into points I can glance at.",
        ),
    ),
    Subpopulation(
        "cheerful-teen",
        {"length": -0.4, "formality": -1.7, "structure": -0.2, "caution": -1.2, "enthusiasm": 2.5, "examples": 0.3},
        "I'm a teenager and I like upbeat, fun replies with emojis!",
        (
            "Hype me up! Cheerful answers with emoji make my day.",
            "Keep it bubbly and excited, I love exclamation marks and smileys.",
            "Talk to me with lots of energy and good vibes, the more emoji the better.",
        ),
    ),
    Subpopulation(
        "example-learner",
        {"length": 1.1, "formality": -0.2, "structure": -0.8, "caution": 0.2, "enthusiasm": 0.1, "examples": 2.6},
        "I learn best from concrete examples; please show me one.",
        (
            "Illustrate your advice with a specific case, that's how I understand things.",
            "Abstract tips don't stick with me, real-life examples do.",
            "Whenever you explain something, walk me through an actual instance of it.",
        ),
    ),
    Subpopulation(
        "seasoned-professional",
        {"length": -0.3, "formality": 1.2, "structure": 0.7, "caution": -2.4, "enthusiasm": -1.4, "examples": -0.1},
        "I am an experienced professional; skip the warnings and hand-holding, just be precise and businesslike.",
        (
            "No disclaimers or cheerleading please, I know the risks; a crisp, professional tone is ideal.",
            "Treat me as an expert: formal, to the point, without caveats.",
            "Spare me the safety notes and the excitement; a sober, correct register suits me.",
        ),
    ),
    Subpopulation(
        "friendly-chatter",
        {"length": 0.8, "formality": -1.1, "structure": -2.0, "caution": 0.1, "enthusiasm": 1.2, "examples": 1.3},
        "I enjoy a friendly chat; talk to me warmly in flowing sentences with an example, not in lists.",
        (
            "Chat with me like a buddy would, in a relaxed flow of sentences, and tell me about a real case.",
            "I like warm, conversational answers that read like a story rather than a checklist.",
            "Be my cheerful friend: natural sentences, a little anecdote, and please no bullet points.",
        ),
    ),
)

MAX_SUBPOPULATIONS = len(SUBPOPULATIONS)


@dataclass(frozen=True)
class Topic:
    goal: str  # completes "How can I ...?"
    tips: tuple[str, str, str]  # imperative phrases, lower case, no final period
    example: str
    caution: str


TOPICS = (
    Topic(
        "sleep better",
        ("keep a regular bedtime", "avoid screens an hour before bed", "keep your bedroom cool and dark"),
        "lights out at 10:30 and up at 6:30, even on weekends",
        "if poor sleep lasts for weeks, see a doctor",
    ),
    Topic(
        "save money on groceries",
        ("plan your meals for the week", "shop with a list", "choose store brands"),
        "one big pot of chili can cover three dinners",
        "bulk deals only pay off if the food does not spoil first",
    ),
    Topic(
        "learn a new language",
        ("practice fifteen minutes every day", "talk with native speakers", "learn the most common words first"),
        "label things at home with their names in the new language",
        "progress differs a lot between people, so do not judge yourself too early",
    ),
    Topic(
        "start running",
        ("begin with run-walk intervals", "get comfortable running shoes", "rest between running days"),
        "alternate one minute of running with two minutes of walking",
        "check with a doctor first if you have heart or joint problems",
    ),
    Topic(
        "keep my houseplants alive",
        ("water only when the soil is dry", "give them bright indirect light", "use pots with drainage holes"),
        "a pothos near an east window needs water about once a week",
        "some common houseplants are toxic to cats and dogs",
    ),
    Topic(
        "prepare for a job interview",
        ("research the company", "practice your answers out loud", "prepare questions for the interviewer"),
        "ask how the team measures success in the first year",
        "never share confidential details from your current employer",
    ),
    Topic(
        "cook fluffy rice",
        ("rinse the rice first", "use about two cups of water per cup of rice", "let it rest covered for ten minutes"),
        "one cup of jasmine rice simmers for about fifteen minutes",
        "do not leave cooked rice out for hours, it can cause food poisoning",
    ),
    Topic(
        "focus while working from home",
        ("set up a dedicated workspace", "work in timed blocks", "silence phone notifications"),
        "twenty-five minutes of work followed by a five minute break",
        "sitting for hours strains your back and eyes, so stand up regularly",
    ),
    Topic(
        "write a strong cover letter",
        ("address the hiring manager by name", "match your skills to the job ad", "keep it to one page"),
        "mention the project where you cut costs by a fifth",
        "never invent experience, employers do check references",
    ),
    Topic(
        "clean a cast iron pan",
        ("wipe it while it is still warm", "scrub with coarse salt", "dry it fully and oil it lightly"),
        "a spoonful of salt and a paper towel lift burnt bits easily",
        "the handle gets very hot, so use an oven mitt",
    ),
    Topic(
        "reduce stress",
        ("take short walks outside", "write down what worries you", "breathe slowly for a few minutes"),
        "a ten minute walk at lunch clears the head",
        "if stress feels overwhelming, talk to a mental health professional",
    ),
    Topic(
        "organize my closet",
        ("remove what you have not worn in a year", "group clothes by type", "use matching hangers"),
        "keep all shirts on the left and all trousers on the right",
        "donate only clean clothes in good condition",
    ),
    Topic(
        "plan a road trip",
        ("map your stops in advance", "book the first night early", "pack snacks and water"),
        "drive four hours a day with a stop at a lake each afternoon",
        "never drive when you are tired, and check the tire pressure before leaving",
    ),
    Topic(
        "make friends in a new city",
        ("join a club around a hobby", "say yes to invitations", "go to the same places regularly"),
        "a weekly board game night at a local cafe",
        "meet new people in public places at first",
    ),
    Topic(
        "stop procrastinating",
        ("break tasks into small steps", "start with just five minutes", "remove distractions from your desk"),
        "write only the first paragraph of a report today",
        "constant procrastination can be a sign of burnout, so watch your energy",
    ),
    Topic(
        "brew better coffee",
        ("grind the beans just before brewing", "use water just off the boil", "weigh your coffee and water"),
        "fifteen grams of coffee for two hundred fifty grams of water",
        "fresh coffee is very hot, so let it cool before drinking",
    ),
    Topic(
        "keep a monthly budget",
        ("track every expense", "set a limit for each category", "review it at the end of each month"),
        "set aside three hundred dollars for food and check it every Sunday",
        "budgets are personal, so talk to a financial adviser about debts",
    ),
    Topic(
        "teach my puppy to sit",
        ("use small treats as rewards", "keep sessions short", "practice at the same time daily"),
        "hold a treat above the nose so the puppy sits to follow it",
        "some human foods like grapes and chocolate are poisonous to dogs",
    ),
    Topic(
        "learn to play guitar",
        ("learn a few open chords", "practice with a metronome", "play songs you actually like"),
        "G, C and D are enough for hundreds of songs",
        "sore fingertips are normal at first, but stop if your wrist hurts",
    ),
    Topic(
        "back up my computer files",
        ("use an external drive", "add a cloud backup", "test restoring a file now and then"),
        "copy your photos to a drive every Friday evening",
        "keep one backup away from home in case of fire or theft",
    ),
    Topic(
        "host a dinner party",
        ("cook dishes you already know", "prepare most food in advance", "ask guests about allergies"),
        "a baked pasta that can sit in the oven while guests arrive",
        "food allergies can be serious, so label every dish",
    ),
    Topic(
        "study for an exam",
        ("test yourself instead of rereading", "spread sessions over several days", "sleep well the night before"),
        "answer last year's questions with a timer running",
        "pulling all-nighters usually hurts your results",
    ),
    Topic(
        "drink more water",
        ("carry a reusable bottle", "drink a glass with every meal", "add fruit for flavor"),
        "refill a half-liter bottle four times a day",
        "people with kidney or heart conditions should ask a doctor how much to drink",
    ),
    Topic(
        "cut down my screen time",
        ("turn off non-essential notifications", "keep the phone out of the bedroom", "set app time limits"),
        "no phone between dinner and breakfast",
        "sudden changes can feel hard, so go step by step",
    ),
    Topic(
        "paint a room",
        ("clean and tape the walls first", "use a primer on dark colors", "apply two thin coats"),
        "cut in the corners with a brush, then roll the open walls",
        "open the windows, because paint fumes can cause headaches",
    ),
    Topic(
        "start a vegetable garden",
        ("pick a sunny spot", "start with easy crops", "water deeply in the morning"),
        "lettuce, radishes and beans grow quickly for beginners",
        "wear gloves, and check that any garden chemicals are safe for food",
    ),
    Topic(
        "give a good presentation",
        ("know your opening by heart", "use few words on each slide", "rehearse with a timer"),
        "open with a surprising number from your data",
        "check the equipment beforehand, because laptops and projectors fail",
    ),
    Topic(
        "choose a laptop",
        ("decide on your budget first", "get at least sixteen gigabytes of memory", "check the battery life"),
        "a light laptop with ten hours of battery for travel",
        "buy from trusted sellers, since fake deals are common online",
    ),
    Topic(
        "keep my kitchen clean",
        ("wash dishes right after meals", "wipe counters every evening", "empty the trash often"),
        "a ten minute tidy after dinner keeps the weekend free",
        "never mix bleach with other cleaners, the fumes are toxic",
    ),
    Topic(
        "get better at cooking",
        ("learn a few basic knife skills", "taste as you go", "follow simple recipes first"),
        "master one soup, one pasta and one stir-fry",
        "keep raw meat apart from vegetables to avoid food poisoning",
    ),
)

PROMPT_TEMPLATES = (
    "How can I {goal}?",
    "Any tips to help me {goal}?",
    "What should I do to {goal}?",
    "I'd like to {goal}. Any advice?",
    "What's a good way to {goal}?",
    "Can you help me {goal}?",
    "Give me some advice on how to {goal}.",
    "I'm trying to {goal}. What do you suggest?",
)

# Phrase banks, keyed by the style bits they depend on: formality, or (formality, enthusiasm).
OPENERS = {
    (0, 0): ("Sure.", "Okay, so here's the deal.", "Yeah, easy one."),
    (0, 1): ("Ooh, love this one! 😄", "Yay, great question! 🎉", "Oh nice, let's go! 🙌"),
    (1, 0): ("Certainly.", "Here is my recommendation.", "Thank you for your question."),
    (1, 1): ("What an excellent question! 🌟", "I am delighted to help with this! ✨", "Wonderful question! 😊"),
}
TIP_LEADS = {
    0: ("just {tip}", "try to {tip}", "you gotta {tip}"),
    1: ("I would recommend that you {tip}", "it is advisable to {tip}", "one should {tip}"),
}
PROSE_CONNECTORS = {0: ("", "Also, ", "And "), 1: ("First, ", "Furthermore, ", "Finally, ")}
LIST_INTROS = {
    0: ("Quick list:", "Here's what works:"),
    1: ("I recommend the following steps:", "Consider these points:"),
}
EXAMPLE_LEADS = {
    0: ("Like, {example}", "For instance, {example}"),
    1: ("For example, {example}", "To illustrate, {example}"),
}
CAUTION_LEADS = {
    0: ("Heads up: {caution}", "Just be careful: {caution}"),
    1: ("Please note: {caution}", "A word of caution: {caution}"),
}
CLOSERS = {
    (0, 1): ("You've got this! 💪", "Have fun with it! 🎉", "You'll do great! 😊"),
    (1, 0): ("I hope this helps.", "I trust this is useful."),
    (1, 1): ("I am confident you will succeed! 🌟", "Best of luck, you will do splendidly! ✨"),
}


@dataclass
class SyntheticPreferenceConfig:
    """
    Options of [`generate_synthetic_preferences`].

    Args:
        num_subpopulations (`int`, defaults to 2):
            M, how many of the designed subpopulations rate (the first M of `SUBPOPULATIONS`, at most 8).
        num_pairs_per_subpopulation (`int`, defaults to 200):
            Rows labelled by each subpopulation; the dataset has M times as many rows.
        num_prompts (`int`, *optional*):
            Distinct prompts to draw from the templates x topics grid (240 of them); all when unset.
        axes (`tuple[str, ...]`, defaults to all of `AXES`):
            Style axes that vary between responses; the others stay at bit 0. Style vectors list these axes in order.
        label_noise (`float`, defaults to 0.0):
            Bradley-Terry temperature of the labels; 0 labels every pair by the argmax of utility.
        conflict_fraction (`float`, defaults to 0.5):
            Fraction of each subpopulation's pairs drawn among pairs that some other selected subpopulation ranks the
            other way; the rest are drawn uniformly (and often conflict too). Ignored when M is 1.
        context_paraphrase (`bool`, defaults to `False`):
            Show each row with a paraphrase of its subpopulation's context instead of the original description.
        conversational (`bool`, defaults to `False`):
            Chat messages (`[{"role": "user", ...}]`, `[{"role": "assistant", ...}]`) instead of plain strings.
        seed (`int`, defaults to 0):
            The dataset is a function of the config, this seed included.
    """

    num_subpopulations: int = 2
    num_pairs_per_subpopulation: int = 200
    num_prompts: int | None = None
    axes: tuple[str, ...] = AXES
    label_noise: float = 0.0
    conflict_fraction: float = 0.5
    context_paraphrase: bool = False
    conversational: bool = False
    seed: int = 0

    def __post_init__(self):
        self.axes = tuple(self.axes)
        _check_num_subpopulations(self.num_subpopulations)
        if not isinstance(self.num_pairs_per_subpopulation, int) or self.num_pairs_per_subpopulation < 1:
            raise ValueError(
                "SyntheticPreferenceConfig.num_pairs_per_subpopulation must be an integer >= 1, "
                f"got {self.num_pairs_per_subpopulation!r}."
            )
        grid_size = len(TOPICS) * len(PROMPT_TEMPLATES)
        if self.num_prompts is not None and (
            not isinstance(self.num_prompts, int) or not 1 <= self.num_prompts <= grid_size
        ):
            raise ValueError(
                f"SyntheticPreferenceConfig.num_prompts must be an integer in [1, {grid_size}], "
                f"got {self.num_prompts!r}."
            )
        unknown = [axis for axis in self.axes if axis not in AXES]
        if not self.axes or unknown or len(set(self.axes)) != len(self.axes):
            raise ValueError(
                f"SyntheticPreferenceConfig.axes must be distinct names among {AXES}, got {self.axes!r}."
            )
        if not self.label_noise >= 0:
            raise ValueError(f"SyntheticPreferenceConfig.label_noise must be >= 0, got {self.label_noise!r}.")
        if not 0 <= self.conflict_fraction <= 1:
            raise ValueError(
                f"SyntheticPreferenceConfig.conflict_fraction must be in [0, 1], got {self.conflict_fraction!r}."
            )
        for m, n in itertools.combinations(range(self.num_subpopulations), 2):
            if not any(_disagree(a, b, m, n, self.axes) for a, b in _style_pairs(len(self.axes))):
                raise ValueError(
                    f"SyntheticPreferenceConfig.axes {self.axes!r} leave subpopulations {m} and {n} with the same "
                    "preferences; add axes."
                )


def subpopulation_contexts(num_subpopulations: int) -> list[str]:
    """Context descriptions of the first `num_subpopulations` subpopulations."""
    _check_num_subpopulations(num_subpopulations)
    return [population.context for population in SUBPOPULATIONS[:num_subpopulations]]


def subpopulation_paraphrases(subpopulation: int) -> list[str]:
    """Other wordings of subpopulation `subpopulation`'s context, for testing routing on unseen contexts."""
    _check_subpopulation(subpopulation)
    return list(SUBPOPULATIONS[subpopulation].paraphrases)


def utility(style, subpopulation: int, axes: tuple[str, ...] = AXES) -> float:
    """u_m(s) = w_m . s, with `style` listing the bits of `axes` in order."""
    _check_subpopulation(subpopulation)
    weights = SUBPOPULATIONS[subpopulation].weights
    return sum(weights[axis] * bit for axis, bit in zip(axes, style, strict=True))


def true_preference(style_a, style_b, subpopulation: int, axes: tuple[str, ...] = AXES) -> int:
    """1 if `subpopulation` prefers the response of style `style_a`, -1 if the one of `style_b`, 0 if indifferent."""
    difference = utility(style_a, subpopulation, axes) - utility(style_b, subpopulation, axes)
    return 0 if abs(difference) < 1e-9 else (1 if difference > 0 else -1)


def preference_probability(
    style_a, style_b, subpopulation: int, axes: tuple[str, ...] = AXES, label_noise: float = 0.0
) -> float:
    """P(a preferred over b) = sigmoid((u_m(a) - u_m(b)) / label_noise); the step function when `label_noise` is 0."""
    difference = utility(style_a, subpopulation, axes) - utility(style_b, subpopulation, axes)
    if label_noise == 0:
        return 0.5 if abs(difference) < 1e-9 else float(difference > 0)
    return 1.0 / (1.0 + math.exp(-difference / label_noise))


def generate_synthetic_preferences(config: SyntheticPreferenceConfig | None = None) -> Dataset:
    """
    A preference dataset in TRL's explicit-prompt format (`prompt`, `chosen`, `rejected`, responses without EOS),
    with the columns `context`, `context_id` ("subpop-m"), `subpopulation` (m), `topic` (index into `TOPICS`) and the
    ground-truth styles `chosen_style` / `rejected_style` (bits of `config.axes`). Rows are shuffled.
    """
    config = config or SyntheticPreferenceConfig()
    rng = random.Random(config.seed)
    grid = list(itertools.product(range(len(TOPICS)), range(len(PROMPT_TEMPLATES))))
    prompts = rng.sample(grid, config.num_prompts or len(grid))
    num_axes = len(config.axes)
    subpopulations = range(config.num_subpopulations)

    rows = []
    for m in subpopulations:
        decided = [(a, b) for a, b in _style_pairs(num_axes) if true_preference(a, b, m, config.axes) != 0]
        others = [n for n in subpopulations if n != m]
        contested = [(a, b) for a, b in decided if any(_disagree(a, b, m, n, config.axes) for n in others)]
        for _ in range(config.num_pairs_per_subpopulation):
            pool = contested if contested and rng.random() < config.conflict_fraction else decided
            style_a, style_b = rng.choice(pool)
            if rng.random() < 0.5:
                style_a, style_b = style_b, style_a
            p_a = preference_probability(style_a, style_b, m, config.axes, config.label_noise)
            chosen, rejected = (style_a, style_b) if rng.random() < p_a else (style_b, style_a)
            topic_index, template_index = rng.choice(prompts)
            topic = TOPICS[topic_index]
            prompt = PROMPT_TEMPLATES[template_index].format(goal=topic.goal)
            chosen_text = render_response(topic, _full_style(chosen, config.axes), rng)
            rejected_text = render_response(topic, _full_style(rejected, config.axes), rng)
            population = SUBPOPULATIONS[m]
            context = rng.choice(population.paraphrases) if config.context_paraphrase else population.context
            if config.conversational:
                prompt = [{"role": "user", "content": prompt}]
                chosen_text = [{"role": "assistant", "content": chosen_text}]
                rejected_text = [{"role": "assistant", "content": rejected_text}]
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": chosen_text,
                    "rejected": rejected_text,
                    "context": context,
                    "context_id": f"subpop-{m}",
                    "subpopulation": m,
                    "topic": topic_index,
                    "chosen_style": list(chosen),
                    "rejected_style": list(rejected),
                }
            )
    rng.shuffle(rows)
    return Dataset.from_list(rows)


def rated_by_topic_owner(dataset: Dataset, num_subpopulations: int) -> Dataset:
    """
    The rows whose rater owns the prompt's topic (subpopulation = topic index mod `num_subpopulations`): data in which
    who rates depends on the prompt, as in HH-RLHF, where harmlessness raters got red-teaming prompts. Mixture modeling
    without context labels can split such data into one head per subpopulation, its router telling them apart by the
    prompt; evaluation data that mixes every topic then needs the context to say who rates.
    """
    if num_subpopulations < 1:
        raise ValueError(f"num_subpopulations must be >= 1, got {num_subpopulations}.")
    missing = {"topic", "subpopulation"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"rated_by_topic_owner needs the generator's columns {sorted(missing)}.")
    return dataset.filter(
        lambda row: row["topic"] % num_subpopulations == row["subpopulation"], desc="Keeping topic owners' ratings"
    )


def render_response(topic: Topic, style: dict[str, int], rng: random.Random) -> str:
    """The text of a response to `topic` with one bit per axis of `AXES` in `style`; phrasing varies with `rng`."""
    formal, enthusiastic = style["formality"], style["enthusiasm"]
    end = "!" if enthusiastic else "."
    tips = list(topic.tips) if style["length"] else [rng.choice(topic.tips)]

    parts = [rng.choice(OPENERS[formal, enthusiastic])]
    if style["structure"]:
        bullets = [f"- {_capitalize(tip)}." if formal else f"- {tip}" for tip in tips]
        parts.append("\n".join([rng.choice(LIST_INTROS[formal]), *bullets]))
    else:
        connectors = PROSE_CONNECTORS[formal] if len(tips) > 1 else ("",)
        sentences = []
        for connector, tip in zip(connectors, tips):
            sentences.append(_capitalize(connector + rng.choice(TIP_LEADS[formal]).format(tip=tip)) + end)
        parts.append(" ".join(sentences))
    if style["examples"]:
        parts.append(rng.choice(EXAMPLE_LEADS[formal]).format(example=topic.example) + ".")
    if style["caution"]:
        parts.append(rng.choice(CAUTION_LEADS[formal]).format(caution=topic.caution) + ".")
    if (formal, enthusiastic) in CLOSERS:
        parts.append(rng.choice(CLOSERS[formal, enthusiastic]))
    return _join(parts)


def _join(parts: list[str]) -> str:
    """Sentences joined by spaces; a bullet list gets line breaks around it."""
    text = parts[0]
    for previous, part in zip(parts, parts[1:]):
        separator = "\n" if "\n- " in previous or "\n- " in part else " "
        text += separator + part
    return text


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def _full_style(bits, axes: tuple[str, ...]) -> dict[str, int]:
    style = dict.fromkeys(AXES, 0)
    style.update(zip(axes, bits, strict=True))
    return style


def _style_pairs(num_axes: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Every unordered pair of distinct style vectors."""
    return list(itertools.combinations(itertools.product((0, 1), repeat=num_axes), 2))


def _disagree(style_a, style_b, m: int, n: int, axes: tuple[str, ...]) -> bool:
    """Both subpopulations have a strict preference, and they are opposite."""
    return true_preference(style_a, style_b, m, axes) * true_preference(style_a, style_b, n, axes) < 0


def _check_num_subpopulations(num_subpopulations) -> None:
    if not isinstance(num_subpopulations, numbers.Integral) or not 1 <= num_subpopulations <= MAX_SUBPOPULATIONS:
        raise ValueError(
            f"num_subpopulations must be an integer in [1, {MAX_SUBPOPULATIONS}], got {num_subpopulations!r}."
        )


def _check_subpopulation(subpopulation) -> None:
    if not isinstance(subpopulation, numbers.Integral) or not 0 <= subpopulation < MAX_SUBPOPULATIONS:
        raise ValueError(f"subpopulation must be an integer in [0, {MAX_SUBPOPULATIONS - 1}], got {subpopulation!r}.")
