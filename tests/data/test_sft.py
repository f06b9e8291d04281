"""Fine-tuning data: `prepare_data --format chat|prompt-response` → packed windows whose loss mask
is exactly the assistant / response tokens, read back through `TokenStream`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megalite.data import loss_mask
from megalite.data.cli import main
from megalite.data.errors import DataError
from megalite.data.manifest import load_manifest
from megalite.data.prepare import prepare
from megalite.data.resume import WorkFolder
from megalite.data.stats import report
from megalite.data.stream import TokenStream
from megalite.model.llama import IGNORE_INDEX
from tests.data.helpers import folder_files, split_tokens, write_jsonl

SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare.txt"
EOS, EOT, BOT = "<|endoftext|>", "<|eot_id|>", "<|begin_of_text|>"
SPECIALS = [EOS, BOT, "<|start_header_id|>", "<|end_header_id|>", EOT]
LLAMA3 = (  # Meta-Llama-3-8B-Instruct's chat template
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SEQ_LEN = 255  # windows of 256 tokens


def shakespeare_lines() -> list[str]:
    text = SHAKESPEARE.read_text(encoding="utf-8")[:60_000]
    return [line for line in text.splitlines() if len(line) > 20 and not line.endswith(":")]


LINES = shakespeare_lines()


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE (vocab 400) with Llama-3's special tokens, trained on Shakespeare."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([LINES], trainer=trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def model_folder(root: Path, tokenizer_json: Path, config: dict, *, jinja: str = "") -> Path:
    """A Hugging Face-style model folder: tokenizer.json, tokenizer_config.json."""
    root.mkdir(parents=True)
    (root / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja:
        (root / "chat_template.jinja").write_text(jinja)
    return root


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_json: Path) -> Path:
    """No chat template (the default one applies); the EOS as an AddedToken dict."""
    root = tmp_path_factory.mktemp("models") / "plain"
    return model_folder(root, tokenizer_json, {"eos_token": {"content": EOS}})


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_json: Path) -> Path:
    root = tmp_path_factory.mktemp("models") / "llama3"
    config = {"eos_token": EOT, "bos_token": BOT}
    return model_folder(root, tokenizer_json, config, jinja=LLAMA3)


def chats(n: int, *, start: int = 0) -> list[dict]:
    """Conversations of 1-2 turns, some with a system message, made of Shakespeare lines."""
    out = []
    for i in range(start, start + n):
        line = LINES[i * 5 : i * 5 + 5]
        messages = [{"role": "system", "content": line[4]}] if i % 3 == 0 else []
        messages += [
            {"role": "user", "content": line[0]},
            {"role": "assistant", "content": line[1]},
        ]
        if i % 2:
            messages += [
                {"role": "user", "content": line[2]},
                {"role": "assistant", "content": line[3]},
            ]
        out.append({"messages": messages})
    return out


def pairs(n: int) -> list[dict]:
    return [{"prompt": LINES[2 * i] + "\n", "response": LINES[2 * i + 1]} for i in range(n)]


def default_render(messages: list[dict]) -> tuple[str, str]:
    """(the whole text, its trained text) under the documented default template."""
    whole = trained = ""
    for m in messages:
        if m["role"] == "assistant":
            whole += f"<|assistant|>\n{m['content']}{EOS}"
            trained += f"{m['content']}{EOS}"
        else:
            whole += f"<|{m['role']}|>\n{m['content']}\n"
    return whole, trained


def llama3_render(messages: list[dict]) -> tuple[str, str]:
    whole, trained = BOT, ""
    for m in messages:
        whole += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}{EOT}"
        if m["role"] == "assistant":
            trained += f"{m['content'].strip()}{EOT}"
    return whole, trained


def pr_render(record: dict) -> tuple[str, str]:
    return record["prompt"] + record["response"] + EOS, record["response"] + EOS


def windows(root: Path, split: str = "train") -> np.ndarray:
    """The split's stored windows (n, window), int32, in stored order."""
    m = load_manifest(root)
    assert m.window is not None
    return split_tokens(root, split).reshape(-1, m.window)


def unpadded(window: np.ndarray, pad_id: int) -> np.ndarray:
    """A window without its padding (trailing context EOS tokens)."""
    end = len(window)
    while end and window[end - 1] == -pad_id - 1:
        end -= 1
    return window[:end]


def check_windows(root: Path, renders: list[tuple[str, str]]) -> None:
    """Every window holds whole records, in order (exactly the ids of tokenising their text at
    once), and its trained tokens decode to exactly their trained text."""
    m = load_manifest(root)
    assert m.stats["records_truncated"] == m.stats["windows_dropped"] == 0
    tok = Tokenizer.from_file(str(m.tokenizer_path))
    k = 0
    for window in windows(root):
        assert len(window) == SEQ_LEN + 1
        ids, trained = loss_mask.decode(unpadded(window, m.eod_token_id))
        text = tok.decode(ids.tolist(), skip_special_tokens=False)
        first = k
        while k < len(renders) and text.startswith("".join(w for w, _ in renders[first : k + 1])):
            k += 1
        assert text == "".join(w for w, _ in renders[first:k]), "a window cut a record"
        assert ids.tolist() == tok.encode(text, add_special_tokens=False).ids
        want = "".join(t for _, t in renders[first:k])
        assert tok.decode(ids[trained].tolist(), skip_special_tokens=False) == want
    assert k == len(renders)


def sft(src: Path, out: Path, tokenizer: Path, data_format: str, **kw: object) -> Path:
    options: dict = {"val_fraction": 0.0, "shard_tokens": 4 * (SEQ_LEN + 1), **kw}
    prepare([src], out, tokenizer=tokenizer, data_format=data_format, seq_len=SEQ_LEN, **options)
    return out


def test_loss_mask_round_trip() -> None:
    assert loss_mask.IGNORE_INDEX == IGNORE_INDEX
    ids = np.array([0, 5, 7, 399, 2, 0])
    trained = np.array([False, True, False, True, True, False])
    stored = loss_mask.encode(ids, trained)
    assert stored.dtype == np.dtype(loss_mask.MASKED_DTYPE)
    assert stored.tolist() == [-1, 5, -8, 399, 2, -1]
    back, mask = loss_mask.decode(stored)
    assert back.tolist() == ids.tolist() and mask.tolist() == trained.tolist()
    inputs, targets = loss_mask.split_window(torch.from_numpy(stored.astype(np.int64))[None])
    assert inputs.tolist() == [ids[:-1].tolist()]
    assert targets.tolist() == [[5, IGNORE_INDEX, 399, 2, IGNORE_INDEX]]
    assert loss_mask.trained_tokens(torch.from_numpy(stored)[None]) == 3


def test_chat_default_template(tmp_path: Path, plain_dir: Path) -> None:
    records = chats(40)
    src = write_jsonl(tmp_path / "chat.jsonl", records)
    m = load_manifest(sft(src, tmp_path / "out", plain_dir, "chat"))
    assert (m.data_format, m.loss_mask, m.window, m.dtype) == ("chat", True, SEQ_LEN + 1, "int32")
    assert (m.eod_token, m.sample_tokens) == (EOS, SEQ_LEN + 1)
    check_windows(tmp_path / "out", [default_render(r["messages"]) for r in records])
    stored = windows(tmp_path / "out")
    assert m.stats["trained_tokens"] == int((stored >= 0).sum())
    assert m.stats["padding_tokens"] + m.stats["context_tokens"] == int((stored < 0).sum())


def test_chat_llama3_template(tmp_path: Path, llama3_dir: Path) -> None:
    records = chats(30, start=7)
    records[0]["messages"][-1]["content"] += "  \n"  # the template trims it
    src = write_jsonl(tmp_path / "chat.jsonl", records)
    m = load_manifest(sft(src, tmp_path / "out", llama3_dir, "chat"))
    assert m.eod_token == EOT  # the folder's EOS
    check_windows(tmp_path / "out", [llama3_render(r["messages"]) for r in records])


def test_prompt_response(tmp_path: Path, plain_dir: Path) -> None:
    records = pairs(60)
    src = write_jsonl(tmp_path / "pr.jsonl", records)
    m = load_manifest(sft(src, tmp_path / "out", plain_dir, "prompt-response"))
    assert m.data_format == "prompt-response"
    check_windows(tmp_path / "out", [pr_render(r) for r in records])
    assert m.split("train").documents == 60
    text = report(tmp_path / "out", top=3)  # `prepare_data stats` decodes the masked ids
    assert f"train: {m.tokens('train'):,} tokens, 60 documents" in text
    assert f"trained tokens: {m.stats['trained_tokens']:,} of {m.tokens('train'):,}" in text


def test_rerun_is_byte_identical_and_folder_equals_file(
    tmp_path: Path, plain_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = write_jsonl(tmp_path / "pr.jsonl", pairs(80))
    common = ["--format", "prompt-response", "--input", str(src), "--seq-len", str(SEQ_LEN)]
    common += ["--shard-tokens", "1024", "--val-fraction", "0.2"]
    runs = [("a", plain_dir), ("b", plain_dir), ("c", plain_dir / "tokenizer.json")]
    for name, tok in runs:
        assert main([*common, "--tokenizer", str(tok), "--output", str(tmp_path / name)]) == 0
    summary = capsys.readouterr().out
    assert "records: 80 read" in summary and "windows of 256" in summary
    assert re.search(r"tokens: [\d,]+ trained, [\d,]+ context, [\d,]+ padding", summary)
    a = folder_files(tmp_path / "a")
    assert len([p for p in a if p.startswith(("train/", "val/"))]) > 2
    assert a == folder_files(tmp_path / "b") == folder_files(tmp_path / "c")


def test_dedup_drops_a_repeated_record(tmp_path: Path, plain_dir: Path) -> None:
    records = chats(6)
    copy = json.loads(json.dumps(records[2]))
    first = copy["messages"][0]
    copy["messages"][0] = {"content": first["content"], "role": first["role"]}  # keys reordered
    src = write_jsonl(tmp_path / "chat.jsonl", [*records, copy])
    m = load_manifest(sft(src, tmp_path / "out", plain_dir, "chat"))
    assert (m.stats["documents_read"], m.stats["duplicates_dropped"]) == (7, 1)
    assert m.split("train").documents == 6
    check_windows(tmp_path / "out", [default_render(r["messages"]) for r in records])


def test_long_records_are_cut_and_untrained_windows_dropped(
    tmp_path: Path, plain_dir: Path
) -> None:
    long = " ".join(LINES[:40])
    records = [*pairs(3), {"prompt": long, "response": "Ay."}, {"prompt": "Q:", "response": long}]
    src = write_jsonl(tmp_path / "pr.jsonl", records)
    m = load_manifest(sft(src, tmp_path / "out", plain_dir, "prompt-response"))
    st = m.stats
    assert (st["records_truncated"], st["windows_dropped"], st["records_dropped"]) == (2, 1, 1)
    assert m.split("train").documents == 4
    last = windows(tmp_path / "out")[-1]  # the cut response: trained to the window's end
    assert (last[-10:] >= 0).all()


BAD = [
    ("chat", {"text": "hi"}, "no 'messages' list"),
    ("chat", {"messages": [{"role": "user"}]}, "message 1 needs a 'role' and a 'content'"),
    ("chat", {"messages": [{"role": "bot", "content": "x"}]}, "message 1 has role 'bot'"),
    ("chat", {"messages": [{"role": "user", "content": "x"}]}, "the chat has no assistant"),
    ("prompt-response", {"prompt": "x"}, "no 'response' field"),
    ("prompt-response", {"response": "x"}, "no 'prompt' field"),
    ("prompt-response", {"prompt": "x", "response": " "}, "the response is empty"),
]


@pytest.mark.parametrize(("data_format", "record", "message"), BAD)
def test_bad_record_names_file_and_line(
    tmp_path: Path, plain_dir: Path, data_format: str, record: dict, message: str
) -> None:
    good = chats(1) if data_format == "chat" else pairs(1)
    src = write_jsonl(tmp_path / "in.jsonl", [*good, record])
    with pytest.raises(DataError, match=re.escape(f"{src}:2: {message}")):
        sft(src, tmp_path / "out", plain_dir, data_format)


def test_tokenizer_folder_and_option_errors(tmp_path: Path, plain_dir: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", pairs(2))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no tokenizer.json or tokenizer.model"):
        sft(src, tmp_path / "a", tmp_path / "empty", "prompt-response")
    with pytest.raises(DataError, match="needs --seq-len"):
        prepare([src], tmp_path / "b", tokenizer=plain_dir, data_format="chat")
    with pytest.raises(DataError, match="needs --tokenizer"):
        prepare([src], tmp_path / "c", data_format="chat", seq_len=8)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match=r"--format chat reads \.jsonl"):
        sft(tmp_path / "x.txt", tmp_path / "d", plain_dir, "chat")


def test_token_stream_reads_one_window_per_sample(tmp_path: Path, llama3_dir: Path) -> None:
    src = write_jsonl(tmp_path / "chat.jsonl", chats(40))
    out = sft(src, tmp_path / "out", llama3_dir, "chat", val_fraction=0.1)
    stored = {tuple(w) for w in windows(out)}
    stream = TokenStream(
        str(out), "train", seq_len=SEQ_LEN, micro_batch_size=3, dp_rank=0, dp_size=1, seed=1
    )
    for _ in range(5):
        batch = stream.next_batch()  # (3, 64)
        assert all(tuple(row.tolist()) in stored for row in batch)
        inputs, targets = loss_mask.split_window(batch)
        assert (inputs >= 0).all()
        assert torch.equal(targets == IGNORE_INDEX, batch[:, 1:] < 0)
    with pytest.raises(DataError, match=f"was packed for seq_len={SEQ_LEN}: set trainer.seq_len"):
        TokenStream(str(out), "val", seq_len=32, micro_batch_size=1, dp_rank=0, dp_size=1, seed=1)


class Interrupt(BaseException):
    """Stands for a kill: nothing in the code under test catches it."""


def test_interrupted_preparation_resumes_byte_identical(
    tmp_path: Path, plain_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = write_jsonl(tmp_path / "chat.jsonl", chats(60))
    reference = folder_files(sft(src, tmp_path / "ref", plain_dir, "chat", val_fraction=0.2))
    original, calls = WorkFolder.save_journal, []

    def save(self: WorkFolder, journal: object) -> None:
        original(self, journal)  # type: ignore[arg-type]
        calls.append(1)
        if len(calls) == 3:
            raise Interrupt

    with monkeypatch.context() as patch:
        patch.setattr(WorkFolder, "save_journal", save)
        with pytest.raises(Interrupt):
            sft(src, tmp_path / "out", plain_dir, "chat", val_fraction=0.2)
    sft(src, tmp_path / "out", plain_dir, "chat", val_fraction=0.2)
    assert folder_files(tmp_path / "out") == reference
