"""The LLM engine on a tiny random Llama saved to disk: batched = unbatched, resume, 2 processes = 1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from memefx.data.collate import train_wordpiece
from memefx.icl.engine import EngineConfig, generate, load, run, score
from memefx.icl.prompts import Member, meme_prompt, pair_prompt

ROOT = Path(__file__).resolve().parents[1]
WORDS = "user system caption image picture text hateful benign sarcastic pair pairs all are the most likely is with label"


def _save_llama(folder, hidden: int) -> str:
    tok = train_wordpiece([WORDS, "out of image caption pairs select say", "#0 #1 #2 : ' ,"] * 3, 300)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return _save_llama(tmp_path_factory.mktemp("tiny_llama"), 32)


@pytest.fixture(scope="module")
def quant_llama(tmp_path_factory):
    """bitsandbytes' 4-bit blocks need rows of at least 64 values."""
    return _save_llama(tmp_path_factory.mktemp("quant_llama"), 64)


def _prompts(n=7):
    rows = []
    for i in range(n):
        target = [Member(f"the text {'pair ' * i}is benign", "a picture"), Member("all hateful", f"picture {i}")]
        rows.append({"group": i, "prompt": pair_prompt(target) if i % 2 else meme_prompt(f"text {i}", "picture")[0]})
    return pd.DataFrame(rows)


def test_generate_and_score_match_unbatched(tiny_llama):
    cfg = EngineConfig(model=tiny_llama, max_new_tokens=6)
    model, tok = load(cfg)
    prompts = _prompts().prompt.tolist()
    keys = [str(i) * 12 for i in range(len(prompts))]
    batched = generate(model, tok, prompts, cfg, keys)
    single = [generate(model, tok, [p], cfg, [k])[0] for p, k in zip(prompts, keys)]
    assert batched == single
    conts = (" benign", " hateful")
    both = score(model, tok, prompts, conts)
    for p, lp in zip(prompts, both):
        assert lp == pytest.approx(score(model, tok, [p], conts)[0], abs=1e-4)
        # independent: log p of the continuation tokens from an unpadded forward
        ids = tok(p + " hateful", add_special_tokens=False, return_tensors="pt")["input_ids"]
        n = ids.shape[1] - len(tok(p, add_special_tokens=False)["input_ids"])
        logp = model(input_ids=ids).logits.log_softmax(-1)[0, -n - 1:-1].gather(1, ids[0, -n:, None]).sum()
        assert lp[1] == pytest.approx(float(logp), abs=1e-4)


def test_killed_run_resumes_without_loss_or_duplicates(tiny_llama, tmp_path):
    cfg = EngineConfig(model=tiny_llama, max_new_tokens=4, batch_size=2)
    prompts = pd.concat([_prompts(), _prompts(2)], ignore_index=True)  # repeated prompts are answered once
    full = run(prompts, cfg, tmp_path / "full")
    partial = run(prompts, cfg, tmp_path / "part", limit=3)
    assert partial.generated_text.isna().sum() > 0
    with open(tmp_path / "part" / "rank0.jsonl", "a") as f:
        f.write('{"key": "cut in the mid')  # a line torn by a kill
    resumed = run(prompts, cfg, tmp_path / "part")
    pd.testing.assert_frame_equal(full, resumed)
    lines = (tmp_path / "part" / "rank0.jsonl").read_text().splitlines()
    assert len([ln for ln in lines if ln.endswith("}")]) == prompts.prompt.nunique()


def test_score_mode_gives_p_hateful(tiny_llama, tmp_path):
    out = run(_prompts(3), EngineConfig(model=tiny_llama), tmp_path / "s", mode="score")
    assert out.p_hateful.between(0, 1).all() and {"logprob_benign", "logprob_hateful"} <= set(out.columns)


def test_torchrun_two_processes_equal_one(tiny_llama, tmp_path):
    prompts = tmp_path / "prompts.parquet"
    _prompts(9).to_parquet(prompts)
    base = ["icl", "run", "--prompts", str(prompts), "--model", tiny_llama, "--max-new-tokens", "4", "--batch-size", "2"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    one = subprocess.run([sys.executable, "-m", "memefx.cli", *base, "--cache", str(tmp_path / "c1"),
                          "--out", str(tmp_path / "one.parquet")], capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29733",
                          "-m", "memefx.cli", *base, "--cache", str(tmp_path / "c2"), "--out", str(tmp_path / "two.parquet")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "c2").iterdir()) == ["rank0.jsonl", "rank1.jsonl"]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "one.parquet"), pd.read_parquet(tmp_path / "two.parquet"))


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_quantized_weights_load_and_run_on_cpu(quant_llama, quantize):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("accelerate")
    full = EngineConfig(model=quant_llama, max_new_tokens=3)
    quant = EngineConfig(model=quant_llama, max_new_tokens=3, quantize=quantize)
    (m, t), (mq, tq) = load(full), load(quant)
    assert "bit" in type(mq.model.layers[0].mlp.up_proj).__name__.lower()  # Linear4bit / Linear8bitLt
    prompts = _prompts(3).prompt.tolist()
    ref, got = score(m, t, prompts, (" benign", " hateful")), score(mq, tq, prompts, (" benign", " hateful"))
    for a, b in zip(ref, got):
        assert b == pytest.approx(a, abs=0.5)  # quantization error, not a different model
    assert len(generate(mq, tq, prompts, quant, ["0" * 12] * 3)) == 3


def test_icl_configs_fill_run_options(tiny_llama, tmp_path):
    import yaml

    from memefx.cli import main

    for path in sorted((ROOT / "configs" / "icl").glob("*.yaml")):
        values = yaml.safe_load(path.read_text())
        assert values["quantize"] == "nf4" and values["model"].startswith("meta-llama/Llama-2-")
    prompts = tmp_path / "p.parquet"
    _prompts(2).to_parquet(prompts)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": tiny_llama, "max_new_tokens": 2, "batch_size": 1}))
    assert main(["icl", "run", "--config", str(config), "--prompts", str(prompts), "--cache", str(tmp_path / "c"),
                 "--out", str(tmp_path / "o.parquet")]) == 0
    assert pd.read_parquet(tmp_path / "o.parquet").generated_text.notna().all()


def test_gpu_check_script_runs_on_cpu_with_a_tiny_model():
    pytest.importorskip("bitsandbytes")
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--shape", "tiny", "--score-batch", "2",
                           "--score-batches", "1", "--gen-batch", "2", "--new-tokens", "4", "--prompt-tokens", "32",
                           "--repeats", "1"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "score_prompts_per_s=" in done.stdout and done.stdout.count("generate_s_per_prompt=") == 2
