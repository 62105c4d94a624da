"""Fine-tuning: PEFT-format adapters both ways, merge, loss parity with transformers + PEFT, resume,
a functional check on held-out data, data validation and masking (HF/PEFT are the oracle)."""

from __future__ import annotations

import copy
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import save_word_tokenizer
from ember.errors import AdapterError, DataError, TrainingError
from ember.loading import load_model
from ember.tokenizer import Tokenizer
from ember.train import data as tdata
from ember.train.data import IGNORE, BatchPlan, Example, load_jsonl, read_jsonl, tokenize_record
from ember.train.forward import batch_loss_sum
from ember.train.adapter_files import apply_adapter, save_adapter
from ember.train.lora import (
    LoRAConfig,
    LoRALinear,
    dropped_positions,
    inject_lora,
    lora_linear_train,
    lora_modules,
)
from ember.train.trainer import TrainConfig, Trainer, list_checkpoints, read_metrics
from ember.train.tune import merge_checkpoint, tune

FP32_TOL = 1e-4
ROOT = Path(__file__).resolve().parent.parent

# Word-level chat template: user turns are "w3 ... w4", assistant turns "w5 ... </s>".
WORD_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}w5 {{ m['content'] }} </s> "
    "{% else %}w3 {{ m['content'] }} w4 {% endif %}{% endfor %}{% if add_generation_prompt %}w5 {% endif %}"
)


def assert_close(ours: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    """Fail with the worst element and the tolerance (llm.c habit)."""
    diff = (ours.float() - ref.float()).abs()
    worst = diff.max().item()
    if not worst < tol:
        idx = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
        raise AssertionError(f"{what}: max |diff| {worst:.3g} at {idx} (ours {ours[idx].item():.6g}, "
                             f"ref {ref[idx].item():.6g}) exceeds tolerance {tol:g}")


def _randomize_adapters(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.2)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)


@pytest.fixture()
def chat_checkpoint(hf_checkpoint, tmp_path):
    """The tiny llama checkpoint with a word tokenizer that has a chat template."""
    folder, hf = hf_checkpoint("llama")
    dest = tmp_path / "chat-ckpt"
    shutil.copytree(folder, dest)
    save_word_tokenizer(dest, chat_template=WORD_TEMPLATE)
    return dest, hf


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------- adapters
@pytest.mark.parametrize("family,targets", [("llama", "all-linear"), ("qwen2", ["q_proj", "v_proj", "down_proj"]),
                                            ("qwen3", "all-linear")])
def test_ember_adapter_loads_in_peft_with_same_logits(hf_checkpoint, tmp_path, family, targets):
    import peft

    folder, hf = hf_checkpoint(family)
    ours = load_model(folder, dtype="fp32")
    cfg = LoRAConfig(r=8, lora_alpha=16, target_modules=targets)
    inject_lora(ours, cfg, seed=0)
    _randomize_adapters(ours, 1)
    save_adapter(ours, tmp_path / "ad", cfg, str(folder))
    raw = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORA" and raw["task_type"] == "CAUSAL_LM" and raw["r"] == 8
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "ad").eval()
    n_peft = sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in pm.modules())
    assert n_peft == len(lora_modules(ours)), "PEFT adapted a different set of modules"
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = pm(ids).logits
        with pm.disable_adapter():
            base = pm(ids).logits
        got = ours(ids)
    assert (ref - base).abs().max() > 1e-2, "the adapter should change the logits"
    assert_close(got, ref, FP32_TOL, f"{family} Ember adapter in PEFT")


def test_peft_adapter_loads_in_ember_with_same_logits(hf_checkpoint, tmp_path):
    import peft

    folder, hf = hf_checkpoint("llama")
    torch.manual_seed(3)
    lcfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                "up_proj", "down_proj"],
                           rank_pattern={"q_proj": 4}, alpha_pattern={"down_proj": 4.0}, use_rslora=True,
                           init_lora_weights=False, task_type="CAUSAL_LM")
    pm = peft.get_peft_model(copy.deepcopy(hf), lcfg).eval()
    pm.save_pretrained(tmp_path / "peft-ad")
    ours = load_model(folder, dtype="fp32")
    names = apply_adapter(ours, tmp_path / "peft-ad")
    assert len(names) == 14
    assert ours.model.layers[0].self_attn.q_proj.r == 4
    assert not any(p.requires_grad for p in ours.parameters())
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert_close(ours(ids), pm(ids).logits, FP32_TOL, "PEFT adapter in Ember")


def test_adapter_errors_name_the_problem(hf_checkpoint, tmp_path):
    folder, _ = hf_checkpoint("llama")
    ours = load_model(folder, dtype="fp32")
    cfg = LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    inject_lora(ours, cfg)
    save_adapter(ours, tmp_path / "ad", cfg)
    raw = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    (tmp_path / "dora").mkdir()
    shutil.copy(tmp_path / "ad" / "adapter_model.safetensors", tmp_path / "dora")
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({**raw, "use_dora": True}))
    with pytest.raises(AdapterError, match="DoRA"):
        apply_adapter(load_model(folder, dtype="fp32"), tmp_path / "dora")
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({**raw, "r": 8}))
    with pytest.raises(AdapterError, match=r"q_proj\.lora_A\.weight.*shape"):
        apply_adapter(load_model(folder, dtype="fp32"), tmp_path / "dora")
    with pytest.raises(AdapterError, match="not found"):
        apply_adapter(load_model(folder, dtype="fp32"), tmp_path)
    with pytest.raises(AdapterError, match="matched no Linear"):
        inject_lora(load_model(folder, dtype="fp32"), LoRAConfig(target_modules=["qq_proj"]))


def test_merged_checkpoint_equals_base_plus_adapter(hf_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    folder, _ = hf_checkpoint("llama-tied")
    ours = load_model(folder, dtype="fp32")
    cfg = LoRAConfig(r=8, lora_alpha=16)
    inject_lora(ours, cfg, seed=0)
    _randomize_adapters(ours, 5)
    save_adapter(ours, tmp_path / "ad", cfg, str(folder))
    out = merge_checkpoint(folder, tmp_path / "ad", tmp_path / "merged")
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    merged = load_model(out, dtype="fp32")
    assert not lora_modules(merged)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(6))
    hf_merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ours(ids)
        assert_close(merged(ids), ref, FP32_TOL, "merged vs base + adapter")
        assert_close(hf_merged(ids).logits, ref, FP32_TOL, "merged checkpoint in HF vs base + adapter")


# ---------------------------------------------------------------------------------------- training numerics
def test_lora_gradients_with_dropout_match_dense_reference():
    """The sparse dropout path gives exactly the gradients of x * mask / (1 - p) with the same mask."""
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 40).double().requires_grad_(False)
    x = torch.randn(3, 7, 24, dtype=torch.float64, requires_grad=True)
    A = torch.randn(8, 24, dtype=torch.float64, requires_grad=True)
    B = torch.randn(40, 8, dtype=torch.float64, requires_grad=True)
    p, s = 0.1, 2.0
    torch.manual_seed(5)
    y = lora_linear_train(x, A, B, base, s, p)
    g = torch.randn_like(y)
    y.backward(g)
    torch.manual_seed(5)
    drop = dropped_positions(x.numel(), p, x.device)
    assert len(drop) > 0
    mask = torch.ones(x.numel(), dtype=torch.float64)
    mask[drop] = 0
    x2, A2, B2 = (t.detach().clone().requires_grad_() for t in (x, A, B))
    y2 = base(x2) + s * ((x2 * mask.view(x.shape) / (1 - p)) @ A2.t()) @ B2.t()
    y2.backward(g)
    for name, a, b in [("y", y, y2), ("dx", x.grad, x2.grad), ("dA", A.grad, A2.grad), ("dB", B.grad, B2.grad)]:
        assert_close(a, b, 1e-10, name)
    n = 2_000_000
    frac = len(dropped_positions(n, 0.05, torch.device("cpu"))) / n
    assert abs(frac - 0.05) < 0.001, f"dropout rate {frac}"


def _random_examples(n: int, seed: int, lo: int = 8, hi: int = 32) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        k = int(torch.randint(lo, hi, (1,), generator=g))
        ids = torch.randint(3, 256, (k,), generator=g).tolist()
        out.append(Example(ids, [False] * (k // 3) + [True] * (k - k // 3), i + 1))
    return out


def test_losses_match_transformers_peft_for_10_steps(hf_checkpoint):
    """Same weights, LoRA init, batches, AdamW, warmup+cosine and clipping: per-step losses agree (fp32)."""
    import peft
    import transformers

    folder, hf = hf_checkpoint("llama")
    ours = load_model(folder, dtype="fp32")
    cfg = TrainConfig(rank=8, alpha=16, dropout=0.0, steps=10, lr=3e-3, batch=2, seq_len=32, warmup=2,
                      schedule="cosine", weight_decay=0.01, dtype="fp32", grad_checkpoint=True)
    inject_lora(ours, cfg.lora(), seed=0)
    plan = BatchPlan(_random_examples(24, 7), cfg.batch, cfg.seq_len, seed=0)
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                                 target_modules="all-linear"))
    with torch.no_grad():  # PEFT starts from Ember's initial A (B is zero in both)
        for name, m in lora_modules(ours).items():
            layer = pm.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(m.lora_A)
            layer.lora_B["default"].weight.copy_(m.lora_B)
    ours_hist = Trainer(ours, plan, cfg, None, progress=False).run()

    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = transformers.get_cosine_schedule_with_warmup(opt, 2, 10)
    pm.train()
    for step in range(10):
        b = plan.collate(plan.epoch(0)[step])
        logits = pm(input_ids=b.input_ids).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b.labels.flatten(), ignore_index=IGNORE)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        ours_loss = ours_hist[step].loss
        rel = abs(ours_loss - loss.item()) / loss.item()
        assert rel < 1e-3, f"step {step + 1}: Ember loss {ours_loss:.6f} vs PEFT {loss.item():.6f} (rel {rel:.2e} > 1e-3)"
    assert ours_hist[-1].loss < ours_hist[0].loss


def test_packed_rows_keep_examples_apart(hf_checkpoint):
    """A packed row's loss equals the sum of its examples' losses computed one by one."""
    folder, _ = hf_checkpoint("mistral")  # sliding window 8: packing must combine with the window
    model = load_model(folder, dtype="fp32")
    exs = _random_examples(6, 11, lo=5, hi=14)
    packed = BatchPlan(exs, 2, 40, pack=True, shuffle=False)
    single = BatchPlan(exs, 1, 40, pack=False, shuffle=False)
    with torch.no_grad():
        total_p, n_p = 0.0, 0
        for _, b in packed.iterate(0):
            assert b.segments is not None
            s, n = batch_loss_sum(model, b.input_ids, b.labels, b.positions, b.segments)
            total_p, n_p = total_p + float(s), n_p + n
        total_s, n_s = 0.0, 0
        for _, b in single.iterate(0):
            s, n = batch_loss_sum(model, b.input_ids, b.labels, b.positions, b.segments)
            total_s, n_s = total_s + float(s), n_s + n
    assert n_p == n_s == sum(e.n_targets for e in exs)
    assert abs(total_p - total_s) < 1e-3 * total_s, (total_p, total_s)


# ---------------------------------------------------------------------------------------- runs
def _copy_task(tmp_path: Path) -> tuple[Path, list[tuple[int, ...]]]:
    """Answer with the first of three words; held-out triples never appear in training."""
    rng = random.Random(0)
    combos = list(itertools.permutations(range(10, 26), 3))
    rng.shuffle(combos)
    train, held = combos[:400], combos[400:440]
    rows = [{"prompt": " ".join(f"w{i}" for i in c) + " w5", "completion": f" w{c[0]}"} for c in train]
    return _write_jsonl(tmp_path / "copy.jsonl", rows), held


def test_finetuning_makes_held_out_answers_correct(hf_checkpoint, tmp_path):
    import ember

    folder, _ = hf_checkpoint("llama")
    data, held = _copy_task(tmp_path)
    cfg = TrainConfig(rank=16, alpha=32, dropout=0.0, steps=100, lr=5e-3, batch=8, seq_len=64, warmup=10,
                      dtype="fp32", pack=True)
    res = tune(folder, data, tmp_path / "out", cfg, progress=False, log=lambda s: None)
    assert res.data.examples == 400 and res.metrics[-1].loss < res.metrics[0].loss
    llm = ember.load(folder, device="cpu", dtype="fp32")
    before = [llm.generate(" ".join(f"w{i}" for i in c) + " w5", max_new_tokens=1, temperature=0).text.strip()
              for c in held]
    apply_adapter(llm.model, tmp_path / "out")
    after = [llm.generate(" ".join(f"w{i}" for i in c) + " w5", max_new_tokens=1, temperature=0).text.strip()
             for c in held]
    want = [f"w{c[0]}" for c in held]
    acc_before = sum(a == w for a, w in zip(before, want)) / len(want)
    acc_after = sum(a == w for a, w in zip(after, want)) / len(want)
    assert acc_before < 0.2, acc_before
    assert acc_after >= 0.9, f"held-out accuracy after fine-tuning {acc_after:.2f} (before {acc_before:.2f})"
    png = (tmp_path / "out" / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    rows = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 101))


def _resume_cfg() -> TrainConfig:
    return TrainConfig(rank=4, alpha=8, dropout=0.1, steps=10, lr=5e-3, batch=2, seq_len=64, warmup=2,
                       dtype="fp32", save_every=3, keep_checkpoints=5, grad_accum=2)


class _Stop(Exception):
    pass


def test_resume_reproduces_uninterrupted_run(hf_checkpoint, tmp_path):
    folder, _ = hf_checkpoint("llama")
    data, _ = _copy_task(tmp_path)
    full = tune(folder, data, tmp_path / "a", _resume_cfg(), progress=False, log=lambda s: None)

    def crash(trainer, m):
        if m.step == 8:
            raise _Stop

    with pytest.raises(_Stop):
        tune(folder, data, tmp_path / "b", _resume_cfg(), progress=False, log=lambda s: None, callback=crash)
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step-000003", "step-000006"]
    with pytest.raises(TrainingError, match="--resume"):
        tune(folder, data, tmp_path / "b", _resume_cfg(), progress=False, log=lambda s: None)
    changed = _resume_cfg()
    changed.lr = 1e-3
    with pytest.raises(TrainingError, match="lr"):
        tune(folder, data, tmp_path / "b", changed, resume=True, progress=False, log=lambda s: None)
    resumed = tune(folder, data, tmp_path / "b", _resume_cfg(), resume=True, progress=False, log=lambda s: None)
    assert resumed.resumed_from.name == "step-000006"
    a = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "a" / "metrics.jsonl")]
    b = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "b" / "metrics.jsonl")]
    assert a == b, f"resumed trajectory differs:\n{a}\n{b}"
    wa = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    assert wa == (tmp_path / "b" / "adapter_model.safetensors").read_bytes()
    assert len(full.metrics) == 10


def test_run_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(hf_checkpoint, tmp_path):
    """SIGKILL in the middle of writing checkpoint 6 (after its optimizer file): resume uses step 3."""
    folder, _ = hf_checkpoint("llama")
    data, _ = _copy_task(tmp_path)
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import ember.train.trainer as tr
        from test_train import _resume_cfg
        from ember.train.tune import tune
        real = tr.save_safetensors
        def save(path, tensors, metadata=None):
            real(path, tensors, metadata)
            if "step-000006" in str(path) and path.name == "optimizer.safetensors":
                os.kill(os.getpid(), signal.SIGKILL)
        tr.save_safetensors = save
        tune({str(folder)!r}, {str(data)!r}, {str(tmp_path / 'k')!r}, _resume_cfg(), progress=False, log=lambda s: None)
    """)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert p.returncode == -9, p.stderr[-2000:]
    ck = tmp_path / "k" / "checkpoints"
    assert [c.name for c in list_checkpoints(ck)] == ["step-000003"]
    assert any(c.name.startswith(".step-000006.tmp-") for c in ck.iterdir()), "the torn write should be a temp folder"
    # The resumed run and the uninterrupted reference run in fresh processes, as the killed run did: what this
    # process did before (other tests' models) must not enter a bit-for-bit comparison.
    def run(out: str, resume: bool) -> dict:
        script = textwrap.dedent(f"""
            import json, sys
            sys.path.insert(0, {str(Path(__file__).parent)!r})
            from test_train import _resume_cfg
            from ember.train.tune import tune
            r = tune({str(folder)!r}, {str(data)!r}, {str(tmp_path / out)!r}, _resume_cfg(), resume={resume},
                     progress=False, log=lambda s: None)
            print(json.dumps({{"from": r.resumed_from.name if r.resumed_from else None,
                               "losses": [m.loss for m in r.metrics]}}))
        """)
        p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-2000:]
        return json.loads(p.stdout.strip().splitlines()[-1])

    res, ref = run("k", True), run("ref", False)
    assert res["from"] == "step-000003" and len(res["losses"]) == 7
    assert res["losses"] == ref["losses"][3:]


# ---------------------------------------------------------------------------------------- data
def test_malformed_lines_are_reported_with_line_numbers_before_training(hf_checkpoint, tmp_path):
    folder, _ = hf_checkpoint("llama")
    bad = _write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "w5 w6", "completion": " w7"},
        {"prompt": "w5"},
        "",
        {"messages": [{"role": "user", "content": "w5"}]},
        [1, 2],
        {"text": 5},
        "{not json",
        {"messages": [{"role": "bot", "content": "w5"}, {"role": "assistant", "content": "w6"}]},
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "w6"}]},
        {"foo": 1},
    ])
    with pytest.raises(DataError) as e:
        tune(folder, bad, tmp_path / "out", TrainConfig(steps=1), progress=False, log=lambda s: None)
    msg = str(e.value)
    for line, what in [(2, 'no "completion"'), (4, "no assistant message"), (5, "got a list"),
                       (6, '"text" must be a string'), (7, "not valid JSON"), (8, "role is 'bot'"),
                       (9, 'no "content"'), (10, "unknown record shape")]:
        assert f"bad.jsonl:{line}: " in msg and what in msg, (line, what, msg)
    assert "bad.jsonl:1:" not in msg and "bad.jsonl:3:" not in msg
    assert not (tmp_path / "out").exists(), "nothing should be written when the data is bad"


def test_chat_loss_mask_covers_assistant_turns_only(chat_checkpoint):
    folder, _ = chat_checkpoint
    tok = Tokenizer.from_dir(folder)
    rec = {"messages": [{"role": "system", "content": "w9"}, {"role": "user", "content": "w10 w11"},
                        {"role": "assistant", "content": "w12 w13"}, {"role": "user", "content": "w14"},
                        {"role": "assistant", "content": "w15", "weight": 0},
                        {"role": "user", "content": "w16"}, {"role": "assistant", "content": "w17"}]}
    ex = tokenize_record(tok, rec)
    words = [tok.id_to_token(i) for i in ex.ids]
    trained = [w for w, t in zip(words, ex.target) if t]
    assert trained == ["w12", "w13", "</s>", "w17", "</s>"], list(zip(words, ex.target))
    all_ex = tokenize_record(tok, rec, loss_on="all")
    assert all(all_ex.target)
    pc = tokenize_record(tok, {"prompt": "w5 w6", "completion": " w7 w8"})
    assert [tok.id_to_token(i) for i, t in zip(pc.ids, pc.target) if t] == ["w7", "w8", "</s>"]
    conv = tokenize_record(tok, {"prompt": [{"role": "user", "content": "w20"}],
                                 "completion": [{"role": "assistant", "content": "w21"}]})
    assert [tok.id_to_token(i) for i, t in zip(conv.ids, conv.target) if t] == ["w21", "</s>"]


def test_overlong_examples_are_truncated_or_dropped_and_counted(chat_checkpoint, tmp_path):
    folder, _ = chat_checkpoint
    tok = Tokenizer.from_dir(folder)
    rows = [{"text": " ".join(["w7"] * 30)},
            {"prompt": " ".join(["w8"] * 30), "completion": " w9"},  # answer lies beyond the cut
            {"prompt": "w5", "completion": " w6"}]
    path = _write_jsonl(tmp_path / "long.jsonl", rows)
    exs, stats = load_jsonl(path, tok, seq_len=10)
    assert (stats.truncated, stats.dropped_no_target, stats.examples) == (2, 1, 2)
    assert max(len(e) for e in exs) == 10
    exs, stats = load_jsonl(path, tok, seq_len=10, overlong="drop")
    assert (stats.dropped_overlong, stats.examples) == (2, 1)
    assert "dropped" in stats.summary()


def test_packing_plan_fills_rows_and_is_deterministic():
    exs = _random_examples(50, 3, lo=3, hi=20)
    plan = BatchPlan(exs, 4, 64, pack=True, seed=9)
    rows = [r for b in plan.epoch(0) for r in b]
    assert sorted(i for r in rows for i in r) == list(range(50))
    assert all(sum(len(exs[i]) for i in r) <= 64 for r in rows)
    assert len(rows) <= sum(len(e) for e in exs) // 64 + 3
    assert plan.epoch(1) != plan.epoch(0) and BatchPlan(exs, 4, 64, pack=True, seed=9).epoch(1) == plan.epoch(1)
    b = plan.collate(plan.epoch(0)[0])
    assert b.segments is not None and b.positions[0, 0] == 0
    mask = tdata.attention_mask(b.segments)
    assert mask.shape == (4, 1, b.input_ids.shape[1], b.input_ids.shape[1])


# ---------------------------------------------------------------------------------------- CLI
def test_tune_and_merge_cli(hf_checkpoint, tmp_path):
    import argparse

    from ember.train.cli import add_parser

    folder, _ = hf_checkpoint("llama")
    data, _ = _copy_task(tmp_path)
    parser = argparse.ArgumentParser(prog="ember")
    add_parser(parser.add_subparsers())
    out = tmp_path / "run"
    args = parser.parse_args(["tune", str(folder), "--data", str(data), "--eval", str(data), "-o", str(out),
                              "--steps", "4", "--batch", "2", "--seq-len", "32", "--pack", "--grad-checkpoint",
                              "--eval-every", "2", "--targets", "q_proj,v_proj", "--rank", "4", "-q"])
    assert args.func(args) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"] and cfg["r"] == 4
    assert cfg["base_model_name_or_path"] == str(folder)
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4]
    args = parser.parse_args(["merge", str(folder), str(out), "-o", str(tmp_path / "merged")])
    assert args.func(args) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_full_finetuning_writes_a_checkpoint(hf_checkpoint, tmp_path):
    folder, _ = hf_checkpoint("llama")
    data, _ = _copy_task(tmp_path)
    cfg = TrainConfig(method="full", steps=3, lr=1e-3, batch=2, seq_len=32, dtype="fp32")
    res = tune(folder, data, tmp_path / "full", cfg, progress=False, log=lambda s: None)
    assert res.metrics[-1].loss < res.metrics[0].loss
    model = load_model(tmp_path / "full" / "model", dtype="fp32")
    base = load_model(folder, dtype="fp32")
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)


def test_qlora_over_nf4_reduces_loss(hf_checkpoint, tmp_path):
    pytest.importorskip("ember.quant")
    folder, _ = hf_checkpoint("llama")
    data, _ = _copy_task(tmp_path)
    cfg = TrainConfig(method="qlora", rank=8, alpha=16, dropout=0.0, steps=20, lr=5e-3, batch=4, seq_len=64,
                      pack=True, dtype="fp32")
    res = tune(folder, data, tmp_path / "q", cfg, progress=False, log=lambda s: None)
    assert res.metrics[-1].loss < res.metrics[0].loss - 0.05


def test_lora_over_a_quantized_base_has_the_gradients_of_its_dequantized_weight():
    quant = pytest.importorskip("ember.quant.quantize")
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96, bias=False)
    q = quant.quantize_linear(lin, "nf4")
    dense = torch.nn.Linear(64, 96, bias=False)
    with torch.no_grad():
        dense.weight.copy_(q.dequantize(torch.float32))
    a, b = LoRALinear(q, 8, 16), LoRALinear(dense, 8, 16)
    with torch.no_grad():
        a.lora_B.normal_()
        b.lora_A.copy_(a.lora_A)
        b.lora_B.copy_(a.lora_B)
    x = torch.randn(2, 5, 64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa), b(xb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert_close(ya, yb, 1e-4, "NF4 output")
    for name, ga, gb in [("dx", xa.grad, xb.grad), ("dA", a.lora_A.grad, b.lora_A.grad),
                         ("dB", a.lora_B.grad, b.lora_B.grad)]:
        assert_close(ga, gb, 1e-4, name)


def test_demo_facts_file_is_valid_chat_data():
    from ember.train.demo import demo_questions, facts_path

    records = read_jsonl(facts_path())
    assert all(tdata.record_format(r) == "messages" for _, r in records)
    qa = demo_questions()
    assert len(qa) == 5 and all(q.endswith("?") and a for q, a in qa)


def test_lora_linear_wraps_a_plain_linear_and_merges_back():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 12)
    lin = LoRALinear(base, r=4, alpha=8)
    with torch.no_grad():
        lin.lora_B.normal_()
    x = torch.randn(5, 16)
    with torch.no_grad():
        y = lin(x)
        lin.merge()
        assert_close(lin(x), y, 1e-5, "merged")
