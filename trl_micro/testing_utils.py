"""
Tiny real models for tests, examples and smoke runs: a byte-level BPE tokenizer trained in memory on a small corpus,
and Llama / BERT backbones built from configs. Nothing is downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModel, BertConfig, LlamaConfig, PreTrainedModel, PreTrainedTokenizerFast

from .configuration_micro import MiCRoConfig
from .modeling_micro import MiCRoRewardModel

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tiny_tokenizer(corpus: Iterable[str], vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `corpus`, with a ChatML chat template; any text tokenizes."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token=None,
        unk_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_backbone_config(tokenizer: PreTrainedTokenizerFast, kind: str = "llama", hidden_size: int = 64):
    """Config of a two-layer backbone sized for unit tests (kind: "llama" decoder or "bert" encoder)."""
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        pad_token_id=tokenizer.pad_token_id,
    )
    if kind == "llama":
        return LlamaConfig(num_key_value_heads=2, max_position_embeddings=1024, **common)
    if kind == "bert":
        return BertConfig(max_position_embeddings=1024, **common)
    raise ValueError(f"Unknown tiny backbone kind {kind!r}; use 'llama' or 'bert'.")


def build_tiny_backbone(tokenizer: PreTrainedTokenizerFast, kind: str = "llama", hidden_size: int = 64, seed: int = 0):
    import torch

    torch.manual_seed(seed)
    return AutoModel.from_config(tiny_backbone_config(tokenizer, kind, hidden_size))


def build_tiny_micro_model(
    tokenizer: PreTrainedTokenizerFast, kind: str = "llama", hidden_size: int = 64, seed: int = 0, **config_kwargs
) -> MiCRoRewardModel:
    """A tiny MiCRo reward model (random backbone) whose prompt marker is the ChatML assistant header."""
    import torch

    torch.manual_seed(seed)
    config = MiCRoConfig(text_config=tiny_backbone_config(tokenizer, kind, hidden_size), **config_kwargs)
    return MiCRoRewardModel(config)


def save_tiny_backbone(path: str, tokenizer: PreTrainedTokenizerFast, kind: str = "llama", seed: int = 0) -> str:
    """Save a tiny backbone and its tokenizer to `path`, loadable like any pretrained checkpoint."""
    backbone: PreTrainedModel = build_tiny_backbone(tokenizer, kind, seed=seed)
    backbone.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class LocalPostgres:
    """
    A private PostgreSQL server on 127.0.0.1, in a temporary folder, for tests and benchmarks of the user stores:
    `initdb` (trust authentication), `pg_ctl start` on a free port, `stop()` removes it. PostgreSQL refuses to run as
    root, so as root it runs as the `postgres` system user. Needs PostgreSQL's server programs (on PATH, or Debian's
    /usr/lib/postgresql/<version>/bin).

    ```python
    with LocalPostgres() as server:
        url = server.create_database("users")   # postgresql://postgres@127.0.0.1:PORT/users
    ```
    """

    def __init__(self):
        import glob
        import shutil

        self.bin_dir = None
        if shutil.which("pg_ctl") is None:
            found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
            if not found:
                raise FileNotFoundError(
                    "PostgreSQL's server programs (initdb, pg_ctl) are not installed: `apt-get install postgresql`."
                )
            self.bin_dir = os.path.dirname(found[-1])
        self.directory = None
        self.port = None

    def _program(self, name: str) -> str:
        return os.path.join(self.bin_dir, name) if self.bin_dir else name

    def _run(self, *command: str) -> None:
        import subprocess

        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run(prefix + list(command), check=True, capture_output=True, timeout=120)

    def start(self) -> LocalPostgres:
        import pwd
        import socket
        import tempfile

        self.directory = tempfile.mkdtemp(prefix="trl-micro-postgres-")
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.directory, user.pw_uid, user.pw_gid)
        data = os.path.join(self.directory, "data")
        self._run(self._program("initdb"), "-D", data, "-A", "trust", "-U", "postgres", "--no-sync")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c max_connections=200"
        self._run(self._program("pg_ctl"), "-D", data, "-o", options, "-w", "-l", f"{data}/server.log", "start")
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create the database `name` and return its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        import shutil

        if self.directory is None:
            return
        try:
            self._run(self._program("pg_ctl"), "-D", os.path.join(self.directory, "data"), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
