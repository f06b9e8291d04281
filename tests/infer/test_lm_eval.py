"""megalite in lm-evaluation-harness: the `megalite` model class gives lm-eval's own `hf` model's
log-likelihoods (per example, within 1e-4) and task scores on the same random Llama (built
locally, converted with from-hf), generates until a stop string, and `megalite-evaluate` prints
its tables and refuses bad input in one line. The tasks are local YAML over jsonl files."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from megalite.checkpoint.cli import main as convert_main
from tests.helpers import save_hf
from tests.infer.tasks import MC_TASK

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's hf model, the reference

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from megalite.infer.evaluate_cli import main as evaluate_main  # noqa: E402
from megalite.infer.evaluate_cli import task_manager  # noqa: E402
from megalite.infer.lm_eval import MegaliteLM  # noqa: E402

WINDOW = 16  # max_length of both models: the rolling texts span several windows

PPL_TASK = """\
task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""
QUESTIONS = [
    ("Who is the king of Denmark?", [" Hamlet", " Claudius", " the ghost"], 1),
    ("What does the fool say?", [" nothing", " all is well", " my lord"], 0),
    ("Where is Romeo?", [" in Verona", " in Mantua", " at the ball", " asleep"], 2),
    ("", [" To be", " or not", " to be"], 0),  # an empty context: conditioned on EOS
    ("Speak, the time is ", ["now", "gone"], 1),  # a trailing space moves to the choice
    ("How many daughters had Lear?", [" three", " two"], 0),
]
TEXTS = [
    "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak.",
    "MENENIUS: Either you must confess yourselves wondrous malicious, or be accused of folly.",
    "Good morrow.",
]


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-datasets")))
        mp.setenv("DISABLE_MULTIPROC", "1")  # lm-eval's bootstrap: no process pool
        yield


@pytest.fixture(scope="module")
def folders(sample_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random HF Llama with the sample's tokenizer (EOS named), its from-hf checkpoint, and
    local tasks."""
    root = tmp_path_factory.mktemp("lm-eval")
    hf = root / "hf"
    save_hf(hf, tokenizer=sample_data / "tokenizer.json")
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}
    (hf / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    assert convert_main(["from-hf", "--src", str(hf), "--dst", str(root / "ml"), "--quiet"]) == 0
    tasks = root / "tasks"
    tasks.mkdir()
    mc = [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS]
    (tasks / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in mc))
    (tasks / "ppl.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (tasks / "tiny_mc.yaml").write_text(MC_TASK.format(data=tasks / "mc.jsonl"))
    (tasks / "tiny_ppl.yaml").write_text(PPL_TASK.format(data=tasks / "ppl.jsonl"))
    return {"hf": hf, "ml": root / "ml", "tasks": tasks, "root": root}


@pytest.fixture(scope="module")
def models(folders: dict[str, Path]) -> tuple[MegaliteLM, Any]:
    ours = MegaliteLM.create_from_arg_string(
        f"checkpoint={folders['ml']},batch_size=4,max_length={WINDOW}", {"device": "cpu"}
    )
    ref = HFLM(pretrained=str(folders["hf"]), device="cpu", batch_size=3, dtype="float32",
               max_length=WINDOW)  # fmt: skip
    return ours, ref


def _evaluate(lm: Any, folders: dict[str, Path]) -> dict[str, Any]:
    manager = TaskManager(include_path=str(folders["tasks"]), include_defaults=False)
    return lm_eval.simple_evaluate(model=lm, tasks=["tiny_mc", "tiny_ppl"], task_manager=manager,
                                   bootstrap_iters=0, log_samples=True)  # fmt: skip


def test_registered_with_lm_eval() -> None:
    from lm_eval.api.registry import get_model

    assert get_model("megalite") is MegaliteLM
    assert get_model("hf") is HFLM  # lm-eval's own models are still found


def test_same_loglikelihoods_and_scores_as_hf(
    models: tuple[MegaliteLM, Any], folders: dict[str, Path]
) -> None:
    ours, ref = (_evaluate(lm, folders) for lm in models)
    for task in ("tiny_mc", "tiny_ppl"):
        a, b = ours["samples"][task], ref["samples"][task]
        assert len(a) == len(b) > 0
        for x, y in zip(a, b, strict=True):
            assert x["doc_id"] == y["doc_id"]
            got = torch.tensor([float(r[0][0] if task == "tiny_mc" else r[0]) for r in x["resps"]])
            want = torch.tensor([float(r[0][0] if task == "tiny_mc" else r[0]) for r in y["resps"]])
            assert (got - want).abs().max() <= 1e-4, (task, x["doc_id"], got, want)
            if task == "tiny_mc":
                assert [r[0][1] for r in x["resps"]] == [r[0][1] for r in y["resps"]]
    mine, theirs = ours["results"], ref["results"]
    for key in ("acc,none", "acc_norm,none"):
        assert mine["tiny_mc"][key] == theirs["tiny_mc"][key]
    for key in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert math.isclose(mine["tiny_ppl"][key], theirs["tiny_ppl"][key], rel_tol=1e-5)


def test_rolling_windows_score_each_token_once(models: tuple[MegaliteLM, Any]) -> None:
    ours, _ = models
    tokens = list(range(1, 41))  # 40 tokens, windows of 16
    for context_len in (1, WINDOW // 2 + 1):
        windows = ours.rolling_windows(tokens, context_len=context_len)
        assert [t for _, cont in windows for t in cont] == tokens
        inputs = [(ctx + cont)[-(WINDOW + 1) :][:-1] for ctx, cont in windows]
        assert inputs[0][0] == ours.prefix_token_id == 0
        assert all(len(x) == WINDOW for x in inputs)
        if context_len > 1:  # half a window of context before each scored token
            assert all(len(cont) <= WINDOW // 2 for _, cont in windows[1:])


def test_generate_until_cuts_at_stop_string(models: tuple[MegaliteLM, Any]) -> None:
    ours, ref = models
    contexts = ["ROMEO: But soft, what light", "JULIET:"]
    full = ours.generate_texts(contexts, {"until": [], "max_gen_toks": 8})
    assert all(full)
    stop = full[0][len(full[0]) // 2 :][:2]
    gen = {"until": [stop], "max_gen_toks": 8}
    reqs = [Instance("generate_until", {}, (c, gen), i) for i, c in enumerate(contexts)]
    got = ours.generate_until(reqs)
    assert got == [text.split(stop)[0] for text in full]
    assert got[0] != full[0]
    assert got == ref.generate_until(reqs)  # hf's greedy continuation, cut the same way


def test_cli_tables(
    models: tuple[MegaliteLM, Any], folders: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    text = folders["root"] / "play.txt"
    text.write_text(" ".join(TEXTS))
    out = folders["root"] / "out" / "results.json"
    argv = [str(folders["ml"]), "--tasks", "tiny_mc", "--include-path", str(folders["tasks"]),
            "--limit", "4", "--batch-size", "2", "--output", str(out),
            "--perplexity", str(text)]  # fmt: skip
    assert evaluate_main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["task", "metric", "value", "stderr"]
    acc = next(line.split() for line in lines if line.split()[:2] == ["tiny_mc", "acc"])
    assert 0 <= float(acc[2]) <= 1 and float(acc[3]) > 0
    assert json.loads(out.read_text())["results"]["tiny_mc"]["acc,none"] == float(acc[2])
    assert ["file", "tokens", "nll/token", "perplexity"] in [line.split() for line in lines]
    row = lines[-1].split()
    # Under max_seq_len (128) tokens: one window, the HF model's loss after the EOS prefix.
    hf_lm = models[1]
    ids = hf_lm.tok_encode(text.read_text())
    assert row[0] == str(text) and int(row[1]) == len(ids) < 128
    with torch.no_grad():
        logits = hf_lm.model(torch.tensor([[0, *ids[:-1]]])).logits[0]
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids)).item()
    assert abs(float(row[2]) - nll) < 1e-4 and abs(float(row[3]) - math.exp(nll)) < 1e-2


def test_cli_unknown_task(folders: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(folders["ml"]), "--tasks", "tiny_mcq", "--include-path", str(folders["tasks"])]
    assert evaluate_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "unknown task 'tiny_mcq'" in err and "tiny_mc" in err.split("closest:")[1]
    assert task_manager.cache_info().hits >= 1  # the index built for test_cli_tables


def test_cli_checkpoint_without_tokenizer(
    folders: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    hf, ml = folders["root"] / "hf-bare", folders["root"] / "ml-bare"
    save_hf(hf, tokenizer=None)
    assert convert_main(["from-hf", "--src", str(hf), "--dst", str(ml), "--quiet"]) == 0
    text = folders["root"] / "bare.txt"
    text.write_text("Good morrow.")
    capsys.readouterr()  # save_hf's progress bars
    assert evaluate_main([str(ml), "--perplexity", str(text)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no tokenizer" in err, err
