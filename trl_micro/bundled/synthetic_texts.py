r"""
The words of the synthetic preference data (`trl_micro.bundled.synthetic`): the style axes, the subpopulations and
how they describe themselves, the topics, and the phrase banks that render a response of a given style.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

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
