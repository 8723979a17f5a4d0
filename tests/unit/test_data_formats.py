"""Data users bring: formats, prompt masking, packing boundaries, the cache, mixing, rank 0 tokenizing
for all ranks, and the error messages."""

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import datasets
import pytest
import torch
from conftest import ROOT, TEXTS, alpaca_record, jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.config.schema import ConfigError, DataConfig, load_config
from pipeline.data.dataset import IGNORE, DataError, Windows, build_split, n_targets
from pipeline.train.evaluation import perplexity

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture
def chat_tok(tokenizer_dir: Path):
    t = AutoTokenizer.from_pretrained(tokenizer_dir)
    t.chat_template = CHAT_TEMPLATE
    return t


def build(tok, tmp_path: Path, split: str = "train", context: int | None = 256, **data) -> Windows:
    data.setdefault("cache_dir", str(tmp_path / "cache"))
    return build_split(DataConfig(**data), split, tok, seed=0, context=context)


def rows_text(tok, w: Windows) -> list[str]:
    mask = w.attention_mask.bool()
    return [tok.decode(w.input_ids[i][mask[i]].tolist()) for i in range(len(w))]


def _chat(t: str) -> dict:
    return {"messages": [{"role": "user", "content": f"Repeat: {t}"}, {"role": "assistant", "content": t}]}


def _write(kind: str, tmp_path: Path) -> Path:
    if kind == "txt":
        (tmp_path / "a.txt").write_text("\n".join(TEXTS))
        return tmp_path / "a.txt"
    if kind == "jsonl":
        return jsonl(tmp_path / "a.jsonl", [{"text": t} for t in TEXTS])
    if kind == "alpaca":
        return jsonl(tmp_path / "a.jsonl", [alpaca_record(t) for t in TEXTS])
    if kind == "chat":
        return jsonl(tmp_path / "a.jsonl", [_chat(t) for t in TEXTS])
    if kind == "csv":
        (tmp_path / "a.csv").write_text("text,other\n" + "".join(f'"{t}",1\n' for t in TEXTS))
        return tmp_path / "a.csv"
    ds = datasets.Dataset.from_dict({"text": TEXTS})
    if kind == "parquet":
        ds.to_parquet(str(tmp_path / "a.parquet"))
        return tmp_path / "a.parquet"
    ds.save_to_disk(str(tmp_path / "saved"))
    return tmp_path / "saved"


@pytest.mark.parametrize("kind", ["txt", "jsonl", "alpaca", "chat", "csv", "parquet", "save_to_disk"])
def test_each_format_loads(kind: str, tmp_path: Path, chat_tok):
    path = _write(kind, tmp_path)
    w = build(chat_tok, tmp_path, train=str(path), packing=False, seq_len=64)
    texts = rows_text(chat_tok, w)
    assert len(texts) == (1 if kind == "txt" else 3)
    for t in TEXTS:
        assert any(t in row for row in texts)
    assert all(row.endswith(("</s>", "</s>\n")) for row in texts)  # EOS, or the chat template's end of turn


def test_alpaca_labels_are_ignored_exactly_on_prompt_tokens(tmp_path: Path, tok):
    recs = [alpaca_record("the quick brown fox"), alpaca_record("vim is a text editor", extra="from the manual")]
    path = jsonl(tmp_path / "a.jsonl", recs)
    w = build(tok, tmp_path, train=str(path), packing=False, seq_len=128)
    for i, rec in enumerate(recs):
        head = "### Instruction:\n" + rec["instruction"] + "\n\n"
        prompt = head + (f"### Input:\n{rec['input']}\n\n" if rec["input"] else "") + "### Response:\n"
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        target = tok(rec["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n = len(p) + len(target)
        assert w.input_ids[i, :n].tolist() == p + target
        assert w.labels[i, : len(p)].eq(IGNORE).all() and w.labels[i, len(p) : n].tolist() == target
        assert w.labels[i, n:].eq(IGNORE).all() and w.attention_mask[i].sum() == n  # padding
    on = build(tok, tmp_path, train=str(path), packing=False, seq_len=128, train_on_prompt=True)
    real = on.attention_mask.bool()
    assert torch.equal(on.labels[real], on.input_ids[real])


def test_chat_labels_cover_exactly_the_assistant_turns(tmp_path: Path, chat_tok):
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second question"},
        {"role": "assistant", "content": "second answer"},
    ]
    path = jsonl(tmp_path / "c.jsonl", [{"messages": msgs}])
    w = build(chat_tok, tmp_path, train=str(path), packing=False, seq_len=128)
    ids, labels = w.input_ids[0][w.attention_mask[0].bool()], w.labels[0][w.attention_mask[0].bool()]
    target = labels != IGNORE
    assert torch.equal(labels[target], ids[target])
    # The rendered conversation, cut into prompt and target runs at the token level.
    runs, cur, flag = [], [], bool(target[0])
    for t, f in zip(ids.tolist(), target.tolist(), strict=True):
        if f != flag:
            runs.append((chat_tok.decode(cur), flag))
            cur, flag = [], f
        cur.append(t)
    runs.append((chat_tok.decode(cur), flag))
    # A turn's target is what the template adds for it: the content and its end-of-turn markup.
    assert [r for r, f in runs if f] == ["first answer</s>\n", "second answer</s>\n"]
    assert "".join(r for r, _ in runs) == chat_tok.apply_chat_template(msgs, tokenize=False)  # no EOS added


def test_alpaca_uses_the_chat_template_when_the_tokenizer_has_one(tmp_path: Path, chat_tok):
    path = jsonl(tmp_path / "a.jsonl", [alpaca_record("the quick brown fox", extra="context")])
    w = build(chat_tok, tmp_path, train=str(path), packing=False, seq_len=64)
    ids = w.input_ids[0][w.attention_mask[0].bool()]
    prompt = ids[w.labels[0][: len(ids)] == IGNORE]
    assert chat_tok.decode(prompt.tolist()).startswith("<|user|>\nRepeat: the quick brown fox\n\ncontext</s>\n")
    assert chat_tok.decode(ids[w.labels[0][: len(ids)] != IGNORE].tolist()) == "the quick brown fox</s>\n"


def test_packing_restarts_positions_and_masks_document_starts(tmp_path: Path, tok):
    docs = ["alpha beta gamma delta", "vim", "the quick brown fox jumps over the lazy dog"] * 4
    path = jsonl(tmp_path / "p.jsonl", [{"text": t} for t in docs])
    w = build(tok, tmp_path, train=str(path), seq_len=16)
    ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in docs]
    stream = [i for d in ids for i in d]
    starts = set(torch.tensor([0] + [len(d) for d in ids]).cumsum(0)[:-1].tolist())
    assert w.input_ids.flatten().tolist() == stream[: len(w) * 16]
    pos, labels = w.position_ids.flatten().tolist(), w.labels.flatten().tolist()
    for k, (p, lab) in enumerate(zip(pos, labels, strict=True)):
        first = k in starts
        assert (p == 0) == (first or k % 16 == 0), k  # restart per document and per window
        assert (lab == IGNORE) == first, k  # no loss on a document's first token


def test_packed_documents_do_not_attend_to_each_other(tmp_path: Path, make_model):
    """Perplexity of packed documents equals that of each document evaluated alone."""
    model_dir = make_model("llama")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    docs = ["alpha beta gamma delta", "vim is a text editor", "the quick brown fox jumps"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in docs]
    path = jsonl(tmp_path / "d.jsonl", [{"text": t} for t in docs])
    w = build(tok, tmp_path, split="eval", eval=str(path), seq_len=sum(map(len, ids)))
    assert len(w) == 1
    loss, _ = perplexity(model, w)
    nll = count = 0.0
    with torch.no_grad():
        for d in ids:
            x = torch.tensor([d])
            nll += model(input_ids=x, labels=x).loss.item() * (len(d) - 1)
            count += len(d) - 1
    assert n_targets(w.labels) == count
    assert loss == pytest.approx(nll / count, rel=1e-5)


def test_unpacked_long_examples_stop_unless_truncated(tmp_path: Path, tok):
    path = jsonl(tmp_path / "l.jsonl", [{"text": "short"}, {"text": "a much longer text " * 10}])
    with pytest.raises(DataError) as e:
        build(tok, tmp_path, train=str(path), packing=False, seq_len=16)
    msg = str(e.value)
    assert "data.train=" in msg and "record 2 has" in msg and "longer than data.seq_len=16" in msg
    assert "max_position_embeddings=256" in msg and "data.truncation=true" in msg and "data.packing=true" in msg
    w = build(tok, tmp_path, train=str(path), packing=False, seq_len=16, truncation=True)
    assert w.attention_mask.sum(1).tolist()[1] == 16
    with pytest.raises(DataError, match=r"data.seq_len=512 is longer than the model's context \(max_position_embed"):
        build(tok, tmp_path, train=str(path), seq_len=512, context=256)


def test_second_run_hits_the_cache(tmp_path: Path, tok, monkeypatch, capsys):
    path = jsonl(tmp_path / "a.jsonl", [alpaca_record(t) for t in TEXTS * 20])
    first = build(tok, tmp_path, train=str(path), seq_len=32)
    assert "cache hit" not in capsys.readouterr().err
    assert len(list((tmp_path / "cache").glob("*/windows.npz"))) == 1

    def no_map(*args, **kwargs):
        raise AssertionError("tokenized again")

    with monkeypatch.context() as m:
        m.setattr(datasets.Dataset, "map", no_map)
        again = build(tok, tmp_path, train=str(path), seq_len=32)
    assert "cache hit" in capsys.readouterr().err
    assert all(torch.equal(a, b) for a, b in zip(first.fields().values(), again.fields().values(), strict=True))
    # A setting or the file changing is a miss: a second entry.
    build(tok, tmp_path, train=str(path), seq_len=32, train_on_prompt=True)
    jsonl(path, [alpaca_record(t) for t in TEXTS * 21])
    build(tok, tmp_path, train=str(path), seq_len=32)
    assert len(list((tmp_path / "cache").glob("*/windows.npz"))) == 3


def test_mix_with_weights(tmp_path: Path, tok):
    a = jsonl(tmp_path / "a.jsonl", [alpaca_record(t) for t in TEXTS * 10])
    b = tmp_path / "b.txt"
    b.write_text(" ".join(TEXTS) * 40)
    alone = [len(build(tok, tmp_path, train=str(p), seq_len=32)) for p in (a, b)]
    mix = [{"path": str(b), "format": "text", "weight": 0.5}]
    w = build(tok, tmp_path, train=str(a), mix=mix, format="alpaca", seq_len=32)
    assert len(w) == alone[0] + round(alone[1] * 0.5)
    w2 = build(tok, tmp_path, train=str(a), mix=[{**mix[0], "weight": 2}], format="alpaca", seq_len=32)
    assert len(w2) == alone[0] + 2 * alone[1]
    again = build(tok, tmp_path, train=str(a), mix=mix, format="alpaca", seq_len=32)
    assert torch.equal(w.input_ids, again.input_ids)  # seeded


def test_num_proc_gives_the_same_windows(tmp_path: Path, tok):
    path = jsonl(tmp_path / "a.jsonl", [{"text": f"{t} {i}"} for i in range(1200) for t in TEXTS[:2]])
    one = build(tok, tmp_path, train=str(path), seq_len=32, num_proc=1, cache_dir="none")
    two = build(tok, tmp_path, train=str(path), seq_len=32, num_proc=2, cache_dir="none")
    assert torch.equal(one.input_ids, two.input_ids) and torch.equal(one.labels, two.labels)


@pytest.mark.parametrize(
    ("content", "data", "message"),
    [
        (b"", {}, r"data.train=.*a.jsonl: file is empty"),
        (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', {}, r"not valid UTF-8 \(line 2: .*\); convert the file to UTF-8"),
        (b'{"body": "x"}\n', {}, r"no field 'text' \(fields: \['body'\]\); set data.text_field"),
        (b'{"instruction": "q"}\n', {"format": "alpaca"}, r"format alpaca needs field\(s\) \['output'\]"),
        (b'{"instruction": "q", "output": null}\n', {}, r"record 1: field 'output' must be a string, got NoneType"),
        (b'{"messages": "hi"}\n', {"format": "chat"}, r"record 1: 'messages' must be a non-empty list"),
        (b'{"text": "hi"}\n', {}, r"\d tokens, fewer than one sequence of data.seq_len=32"),
        (b'{"instruction": "' + b"q " * 40 + b'", "output": "a"}\n', {}, r"no window has a token to train on"),
    ],
)
def test_error_messages(content: bytes, data: dict, message: str, tmp_path: Path, chat_tok):
    path = tmp_path / "a.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        build(chat_tok, tmp_path, train=str(path), seq_len=32, **data)


def test_more_error_messages(tmp_path: Path, tok):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9 au lait\n")
    with pytest.raises(DataError, match=r"bad.txt: not valid UTF-8"):
        build(tok, tmp_path, train=str(bad))
    chat = jsonl(tmp_path / "c.jsonl", [_chat("hi")])
    with pytest.raises(DataError, match="chat data needs a tokenizer with a chat_template"):
        build(tok, tmp_path, train=str(chat))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": TEXTS})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"holds several splits \(train\); point data.train at one of them"):
        build(tok, tmp_path, train=str(tmp_path / "dd"))
    (tmp_path / "a.xlsx").write_text("x")
    with pytest.raises(DataError, match=r"unknown file type '.xlsx'"):
        build(tok, tmp_path, train=str(tmp_path / "a.xlsx"))
    good = jsonl(tmp_path / "g.jsonl", [{"text": t} for t in TEXTS * 10])
    with pytest.raises(DataError, match=r"data.mix\[0\]=.*nope.jsonl: file not found"):
        build(tok, tmp_path, train=str(good), mix=[{"path": str(tmp_path / "nope.jsonl")}])


def test_config_checks_data_keys():
    with pytest.raises(ConfigError) as e:
        load_config(
            ROOT / "configs" / "demo.yaml",
            [
                "data.format=sharegpt",
                "data.mix=[{path: a.jsonl, weight: 0}, {pth: b.jsonl}, c.txt]",
                "data.num_proc=0",
            ],
        )
    msg = str(e.value)
    assert "data.format='sharegpt': must be one of auto, text, jsonl, alpaca, chat" in msg
    assert "data.mix[0].weight=0: must be a number > 0" in msg
    assert "data.mix[1]: unknown key(s) ['pth']" in msg and "data.mix[1].path: set it" in msg
    assert "data.mix[2]='c.txt': expected a mapping" in msg and "data.num_proc=0: must be >= 1" in msg
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["data.mix=[{path: a.jsonl, format: chat, weight: 2}]"])
    assert [(s.key, s.format, s.weight) for s in cfg.data.sources("train")] == [
        ("data.train", "auto", 1.0),
        ("data.mix[0]", "chat", 2.0),
    ]


def _evaluate_tool(monkeypatch) -> types.ModuleType:
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script rewrites sys.path[0]; spawned tests need it
    tool = importlib.import_module("pipeline.cli.evaluate")  # the command tools/evaluate.py wraps
    return tool


def test_evaluate_tool_on_instruction_data(tmp_path: Path, make_model, monkeypatch, capsys):
    tool = _evaluate_tool(monkeypatch)
    path = jsonl(tmp_path / "qa.jsonl", [alpaca_record(t) for t in TEXTS * 10])
    model = str(make_model("llama"))
    argv = ["--model", model, "--text", str(path), "--seq-len", "64", "--speed-batch", "0"]
    for extra in ([], ["--no-packing"]):
        assert tool.main([*argv, "--format", "alpaca", *extra]) == 0
        assert f"{model}: params" in capsys.readouterr().out


def test_plain_text_eval_next_to_alpaca_training_data(tmp_path: Path, tok):
    # data.eval has its own format (auto by default), so data.format=alpaca does not apply to it
    train = jsonl(tmp_path / "train.jsonl", [alpaca_record(f"item {i}") for i in range(8)])
    (tmp_path / "eval.txt").write_text("plain held-out text\n" * 40)
    kw = {"train": str(train), "eval": str(tmp_path / "eval.txt"), "format": "alpaca"}
    assert len(build(tok, tmp_path, "train", **kw)) > 0
    assert len(build(tok, tmp_path, "eval", **kw)) > 0
    with pytest.raises(DataError, match="a plain text file has no records"):
        build(tok, tmp_path, "eval", eval_format="alpaca", **kw)
