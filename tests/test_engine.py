"""The LLM engine on a tiny random Llama saved to disk: batched = unbatched, resume, 2 processes = 1."""

from __future__ import annotations

import json
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
from tests.conftest import free_port

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
    """A model whose ' hateful' tokens are planted to win scores p_hateful near 1, one planted the other way
    near 0, whatever order the continuations are given in: the columns cannot be swapped."""
    from memefx.icl.engine import encode_continuations

    model, tok = load(EngineConfig(model=tiny_llama))
    prompts = _prompts(3)
    words = {c: {t for p in prompts.prompt for t in encode_continuations(tok, p, [c])[0]} for c in (" hateful", " benign")}
    only = {c: sorted(words[c] - words[o]) for c, o in ((" hateful", " benign"), (" benign", " hateful"))}
    assert only[" hateful"] and only[" benign"]

    def planted(winner):
        def hook(module, args, logits):
            logits[..., only[winner]] += 30.0
            return logits
        return model.lm_head.register_forward_hook(hook)

    for winner, order in ((" hateful", (" benign", " hateful")), (" hateful", (" hateful", " benign")),
                          (" benign", (" benign", " hateful"))):
        handle = planted(winner)
        try:
            out = run(prompts, EngineConfig(model=tiny_llama), tmp_path / f"s{winner}{order[0]}", mode="score",
                      continuations=order, model=model, tok=tok)
        finally:
            handle.remove()
        assert {"logprob_benign", "logprob_hateful"} <= set(out.columns)
        assert (out.p_hateful > 0.99).all() if winner == " hateful" else (out.p_hateful < 0.01).all(), (winner, order)


@pytest.mark.slow  # spawns processes
def test_torchrun_two_processes_equal_one(tiny_llama, tmp_path):
    prompts = tmp_path / "prompts.parquet"
    _prompts(9).to_parquet(prompts)
    base = ["icl", "run", "--prompts", str(prompts), "--engine.model", tiny_llama, "--engine.max_new_tokens", "4",
            "--engine.batch_size", "2"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    one = subprocess.run([sys.executable, "-m", "memefx.cli", *base, "--cache", str(tmp_path / "c1"),
                          "--out", str(tmp_path / "one.parquet")], capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
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
    """The YAML configs and the flags share one schema: run's signature with EngineConfig nested."""
    import yaml

    from memefx.cli import main
    from memefx.icl.cli import build_parser

    parser = build_parser()
    for path in sorted((ROOT / "configs" / "icl").glob("*.yaml")):
        values = yaml.safe_load(path.read_text())
        assert values["engine"]["model"].startswith("meta-llama/Llama-2-")
        parsed = parser.parse_args(["run", "--config", str(path), "--prompts", "p", "--cache", "c", "--out", "o",
                                    "--engine.batch_size", "3"])
        engine = parser.instantiate(parsed)["run"].engine
        assert isinstance(engine, EngineConfig) and engine.batch_size == 3
        assert engine.quantize == ("nf4" if path.stem.endswith("_nf4") else None)
    prompts = tmp_path / "p.parquet"
    _prompts(2).to_parquet(prompts)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"engine": {"model": tiny_llama, "max_new_tokens": 2, "batch_size": 1}}))
    assert main(["icl", "run", "--config", str(config), "--prompts", str(prompts), "--cache", str(tmp_path / "c"),
                 "--out", str(tmp_path / "o.parquet")]) == 0
    assert pd.read_parquet(tmp_path / "o.parquet").generated_text.notna().all()
    config.write_text(yaml.safe_dump({"engine": {"model": tiny_llama, "no_such_option": 1}}))
    with pytest.raises(SystemExit):  # an unknown key is refused, never ignored
        main(["icl", "run", "--config", str(config), "--prompts", str(prompts), "--cache", "c", "--out", "o"])


@pytest.mark.slow  # spawns processes
def test_gpu_check_script_runs_on_cpu_with_a_tiny_model():
    pytest.importorskip("bitsandbytes")
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--shape", "tiny", "--score-batch", "2",
                           "--score-batches", "1", "--gen-batch", "2", "--new-tokens", "4", "--prompt-tokens", "32",
                           "--repeats", "1"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "score_prompts_per_s=" in done.stdout and done.stdout.count("generate_s_per_prompt=") == 2


def _independent_logp(model, tok, prompt: str, cont: str) -> float:
    """log p(continuation | prompt) from one unpadded forward of the joined text, with no cache."""
    n = len(tok(prompt, add_special_tokens=False)["input_ids"])
    ids = tok(prompt + cont, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logp = model(input_ids=ids).logits.log_softmax(-1)[0, n - 1:-1].gather(1, ids[0, n:, None]).sum()
    return float(logp)


def test_multi_token_continuations_scored_on_the_prompt_cache(tiny_llama):
    """Continuations of several tokens (second forward on the key/value cache) equal a plain forward, and the
    prompt is forwarded once: forwarded tokens = prompt tokens + (continuation tokens - 1) per continuation."""
    from memefx.icl.engine import EngineStats, encode_continuations

    model, tok = load(EngineConfig(model=tiny_llama))
    prompts = _prompts(5).prompt.tolist()
    conts = (" benign", " all pairs are hateful", " the most likely label is sarcastic")
    stats = EngineStats()
    got = score(model, tok, prompts, conts, stats=stats)
    for p, lps in zip(prompts, got):
        assert lps == pytest.approx([_independent_logp(model, tok, p, c) for c in conts], abs=1e-4)
    n_cont = [len(c) for p in prompts for c in encode_continuations(tok, p, conts)]
    assert max(n_cont) > 3  # the cache path is exercised
    assert stats.prompt_tokens == sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    assert stats.forwarded_tokens == stats.prompt_tokens + sum(n - 1 for n in n_cont)


def test_continuation_glued_to_the_prompt_is_refused_and_the_scored_text_said(tiny_llama, tmp_path, capsys):
    from memefx.icl.cli import main as icl_main
    from memefx.icl.engine import UserError, encode_continuations

    _, tok = load(EngineConfig(model=tiny_llama))
    with pytest.raises(UserError, match=r"continuation 'benign' would be scored glued to the prompt's end "
                                        r"\(.*System:benign'\): start it with a space \(' benign'\)"):
        encode_continuations(tok, "User: is it hateful?\nSystem:", ["benign", "hateful"])
    assert encode_continuations(tok, "User: is it hateful?\nSystem: ", ["benign"])  # the prompt holds the space
    prompts = tmp_path / "p.parquet"
    _prompts(2).to_parquet(prompts)
    args = ["run", "--prompts", str(prompts), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o.parquet"),
            "--engine.model", tiny_llama, "--mode", "score"]
    assert icl_main([*args, "--continuations", "[benign,hateful]"]) == 2
    assert "start it with a space" in capsys.readouterr().err
    assert icl_main(args) == 0
    assert "scored after each prompt: ' benign', ' hateful'" in capsys.readouterr().out


def test_length_batches_group_similar_lengths():
    from memefx.icl.engine import length_batches

    lengths = [50, 3, 48, 4, 49, 5]
    batches = length_batches(lengths, 2)
    assert batches == [[1, 3], [5, 2], [4, 0]]
    assert sorted(i for b in batches for i in b) == list(range(6))


def test_ranks_shard_all_keys_first_and_resume_a_torn_two_process_run(tiny_llama, tmp_path):
    """Two ranks killed at different points, one with a torn last line, resume: no prompt lost or repeated.

    Rank 0 finishes its shard before rank 1 reads the cache: when ranks split only what they saw missing,
    rank 1 then took every other prompt of its own half and left the rest to nobody."""
    cfg = EngineConfig(model=tiny_llama, max_new_tokens=3, batch_size=2)
    prompts = _prompts(9)
    full = run(prompts, cfg, tmp_path / "one")
    cache = tmp_path / "two"
    assert run(prompts, cfg, cache, rank=1, world_size=2, limit=2) is None  # killed after 2 prompts
    with open(cache / "rank1.jsonl", "a") as f:
        f.write('{"key": "3fa9c1", "generated_te')  # torn by the kill
    with pytest.raises(RuntimeError, match="rerun"):  # rank 0 alone cannot merge: rank 1's shard is unfinished
        run(prompts, cfg, cache, rank=0, world_size=2)
    assert run(prompts, cfg, cache, rank=1, world_size=2) is None  # rank 1 resumes after rank 0 wrote its shard
    with pytest.warns(UserWarning, match="skipped 1 cache line"):
        merged = run(prompts, cfg, cache, rank=0, world_size=2)
    pd.testing.assert_frame_equal(full, merged)
    keys = [json.loads(line)["key"] for shard in ("rank0.jsonl", "rank1.jsonl")
            for line in (cache / shard).read_text().splitlines() if line.endswith("}")]
    assert len(keys) == len(set(keys)) == prompts.prompt.nunique()


def test_cache_skips_lines_that_are_json_but_no_answer(tiny_llama, tmp_path):
    cfg = EngineConfig(model=tiny_llama, max_new_tokens=3)
    prompts = _prompts(3)
    full = run(prompts, cfg, tmp_path / "c")
    with open(tmp_path / "c" / "rank0.jsonl", "a") as f:
        f.write('[1, 2]\n"text"\n{"key": 5}\n{"key": "abc"}\n{"key": "abd", "generated_text": null}\n')
    with pytest.warns(UserWarning, match="skipped 5 cache line.*not an answer object"):
        again = run(prompts, cfg, tmp_path / "c", model=_Refuse(), tok=_Refuse())
    pd.testing.assert_frame_equal(full, again)


class _Refuse:
    """A model that must not be used: the cache should answer."""

    def __getattr__(self, name):
        raise AssertionError("the cache should have answered")

    def __call__(self, *args, **kwargs):
        raise AssertionError("the cache should have answered")


def test_cache_follows_the_weights_not_the_path(tiny_llama, tmp_path):
    """A copy of the model elsewhere reuses the cache; new weights in the same folder recompute."""
    import shutil

    from memefx.icl.engine import model_fingerprint

    cfg = EngineConfig(model=tiny_llama, max_new_tokens=3)
    prompts = _prompts(3)
    full = run(prompts, cfg, tmp_path / "c")
    copy = shutil.copytree(tiny_llama, tmp_path / "copy")
    moved = run(prompts, EngineConfig(model=str(copy), max_new_tokens=3), tmp_path / "c", model=_Refuse(), tok=_Refuse())
    pd.testing.assert_frame_equal(full, moved)
    before = model_fingerprint(str(copy))
    torch.manual_seed(1)
    model = LlamaForCausalLM.from_pretrained(copy)
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight))
    model.save_pretrained(copy)
    assert model_fingerprint(str(copy)) != before
    with pytest.raises(AssertionError, match="cache should have answered"):
        run(prompts, EngineConfig(model=str(copy), max_new_tokens=3), tmp_path / "c", model=_Refuse(), tok=_Refuse())


@pytest.mark.parametrize("name", ["/no/such/folder", "no-such-model-xyz", "nobody/no-such-model"])
def test_missing_model_folder_is_a_clear_user_error(name, tmp_path, capsys):
    from memefx.cli import main
    from memefx.icl.engine import UserError, load

    with pytest.raises(UserError, match=f"no model folder '{name}'"):
        load(EngineConfig(model=name))
    prompts = tmp_path / "p.parquet"
    _prompts(2).to_parquet(prompts)
    assert main(["icl", "run", "--prompts", str(prompts), "--engine.model", name, "--cache", str(tmp_path / "c"),
                 "--out", str(tmp_path / "o.parquet")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("memefx icl run: no model folder") and "\n" not in err


@pytest.mark.slow  # spawns torchrun twice
def test_killed_torchrun_with_a_torn_line_resumes_without_loss_or_repeat(tiny_llama, tmp_path):
    """A real 2-process run killed mid-way (SIGKILL to the whole group), a torn line appended as a kill
    mid-write leaves it, then the same command again: the merged table equals a one-process run and every
    prompt is answered exactly once across the shards."""
    import signal
    import time

    prompts = pd.concat([_prompts(7)] * 8, ignore_index=True)
    prompts["prompt"] = [f"{p} #{i}" for i, p in enumerate(prompts.prompt)]  # 56 distinct prompts
    path = tmp_path / "prompts.parquet"
    prompts.to_parquet(path)
    cfg = EngineConfig(model=tiny_llama, max_new_tokens=24, batch_size=1)
    expected = run(prompts, cfg, tmp_path / "one")
    cache = tmp_path / "c2"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               "-m", "memefx.cli", "icl", "run", "--prompts", str(path), "--engine.model", tiny_llama,
               "--engine.max_new_tokens", "24", "--engine.batch_size", "1", "--cache", str(cache),
               "--out", str(tmp_path / "two.parquet")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)

    def lines(shard: str) -> int:
        p = cache / shard
        return len(p.read_text().splitlines()) if p.is_file() else 0

    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None and min(lines("rank0.jsonl"), lines("rank1.jsonl")) < 3:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    done = lines("rank0.jsonl") + lines("rank1.jsonl")
    assert 6 <= done < prompts.prompt.nunique(), f"{done} answers before the kill"  # killed mid-run
    with open(cache / "rank1.jsonl", "a") as f:
        f.write('{"key": "0f3a", "generated_text": "cut')
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    pd.testing.assert_frame_equal(expected, pd.read_parquet(tmp_path / "two.parquet"))
    keys = [json.loads(line)["key"] for shard in ("rank0.jsonl", "rank1.jsonl")
            for line in (cache / shard).read_text().splitlines() if line.endswith("}")]
    assert len(keys) == len(set(keys)) == prompts.prompt.nunique()


# ------------------------------------------------------------------------------ the published generation setting
def test_published_config_is_the_authors_setting():
    """configs/icl/llama2_13b_chat_published.yaml: the reference pipeline's settings, field by field
    (few_shot_generation.py, Llama-2-13b-chat-hf.yaml, text_generation.py, hf_llama2.ipynb)."""
    import yaml

    from memefx.icl.cli import build_parser

    path = ROOT / "configs" / "icl" / "llama2_13b_chat_published.yaml"
    parsed = build_parser().parse_args(["run", "--config", str(path), "--prompts", "p", "--cache", "c", "--out", "o"])
    engine = build_parser().instantiate(parsed)["run"].engine
    assert engine == EngineConfig(model="meta-llama/Llama-2-13b-chat-hf", dtype="float16", quantize=None, batch_size=1,
                                  max_new_tokens=None, max_length=2000, do_sample=True, temperature=1.0, top_k=10,
                                  top_p=1.0, seed=0, add_bos=False)
    assert yaml.safe_load(path.read_text())["mode"] == "generate"
    assert engine.new_tokens(600) == 1400  # prompt tokens count against max_length, as transformers counts them


def test_new_tokens_applies_both_limits():
    assert EngineConfig(model="m", max_new_tokens=64).new_tokens(1000) == 64
    assert EngineConfig(model="m", max_new_tokens=None, max_length=100).new_tokens(30) == 70
    assert EngineConfig(model="m", max_new_tokens=50, max_length=100).new_tokens(30) == 50
    assert EngineConfig(model="m", max_new_tokens=50, max_length=100).new_tokens(70) == 30


@pytest.mark.parametrize("bad,match", [({"max_new_tokens": None}, "both None"), ({"top_k": -1}, "top_k=-1"),
                                       ({"max_length": 0}, "max_length=0"), ({"top_p": 0.0}, "top_p=0.0"),
                                       ({"temperature": 0.0}, "temperature=0.0")])
def test_engine_settings_that_cannot_work_are_refused(bad, match):
    from memefx.icl.engine import UserError

    with pytest.raises(UserError, match=match):
        EngineConfig(model="m", **bad)


def test_top_k_one_samples_the_greedy_answer(tiny_llama):
    """Sampling among the single most likely token is greedy decoding, whatever the seed: top_k reaches generate."""
    greedy = EngineConfig(model=tiny_llama, max_new_tokens=5)
    model, tok = load(greedy)
    prompts = _prompts(4).prompt.tolist()
    keys = [str(i) * 12 for i in range(len(prompts))]
    expected = generate(model, tok, prompts, greedy, keys)
    assert generate(model, tok, prompts, EngineConfig(model=tiny_llama, max_new_tokens=5, do_sample=True, top_k=1,
                                                      seed=3), keys) == expected
    wide = EngineConfig(model=tiny_llama, max_new_tokens=5, do_sample=True, top_k=0, temperature=5.0)
    assert generate(model, tok, prompts, wide, keys) != expected  # without the cut, hot sampling wanders


def test_max_length_counts_the_prompt_tokens_batched_or_not(tiny_llama):
    """Each answer gets max_length minus its own prompt's tokens: a batch of prompts of different lengths
    gives every row what that prompt alone gets with max_new_tokens = its room."""
    from memefx.icl.engine import encode_prompt

    model, tok = load(EngineConfig(model=tiny_llama))
    prompts = _prompts(5).prompt.tolist()
    lengths = [len(encode_prompt(tok, p)) for p in prompts]
    assert len(set(lengths)) > 2
    limit = max(lengths) + 3
    cfg = EngineConfig(model=tiny_llama, max_new_tokens=None, max_length=limit, batch_size=5)
    keys = [str(i) * 12 for i in range(len(prompts))]
    batched = generate(model, tok, prompts, cfg, keys)
    for p, k, n, got in zip(prompts, keys, lengths, batched):
        alone = EngineConfig(model=tiny_llama, max_new_tokens=limit - n)
        assert got == generate(model, tok, [p], alone, [k])[0]
    longest = lengths.index(max(lengths))
    longer = EngineConfig(model=tiny_llama, max_new_tokens=8)
    assert batched[longest] != generate(model, tok, [prompts[longest]], longer, [keys[longest]])[0]  # the limit bites


def test_a_prompt_with_no_room_under_max_length_is_refused_before_any_answer(tiny_llama, tmp_path):
    from memefx.icl.engine import UserError, encode_prompt

    model, tok = load(EngineConfig(model=tiny_llama))
    prompts = _prompts(3)
    longest = max(len(encode_prompt(tok, p)) for p in prompts.prompt)
    cfg = EngineConfig(model=tiny_llama, max_new_tokens=None, max_length=longest)
    with pytest.raises(UserError, match=f"no room for an answer under engine.max_length={longest}"):
        run(prompts, cfg, tmp_path / "c", model=model, tok=tok)
    assert not (tmp_path / "c" / "rank0.jsonl").exists()  # nothing was answered, nothing cached


@pytest.mark.parametrize("change", [{"top_k": 10}, {"max_length": 900}, {"max_new_tokens": 4}, {"add_bos": False},
                                    {"seed": 1}, {"temperature": 0.7}])
def test_every_decoding_setting_is_in_the_cache_key(tiny_llama, tmp_path, change):
    """A cached answer is reused only under the same settings: top_k and max_length (new) as every other one;
    batch_size changes no answer and reuses the cache."""
    from dataclasses import replace

    from memefx.icl.engine import cache_key

    cfg = EngineConfig(model=tiny_llama, max_new_tokens=3, do_sample=True, top_k=20, batch_size=2)
    prompts = _prompts(3)
    full = run(prompts, cfg, tmp_path / "c")
    again = run(prompts, replace(cfg, batch_size=3), tmp_path / "c", model=_Refuse(), tok=_Refuse())
    pd.testing.assert_frame_equal(full, again)
    other = replace(cfg, **change)
    assert cache_key(other, "generate", "p", fingerprint="f") != cache_key(cfg, "generate", "p", fingerprint="f")
    with pytest.raises(AssertionError, match="cache should have answered"):
        run(prompts, other, tmp_path / "c", model=_Refuse(), tok=_Refuse())


def test_add_bos_false_tokenises_as_the_published_pipeline(tiny_llama):
    """The reference pipeline tokenised the raw prompt with add_special_tokens=False: no BOS, no chat template."""
    from memefx.icl.engine import encode_prompt

    _, tok = load(EngineConfig(model=tiny_llama))
    tok.bos_token = "[CLS]"  # a tokenizer with a BOS token, as Llama's
    prompt = _prompts(2).prompt.iloc[1]
    plain = tok(prompt, add_special_tokens=False)["input_ids"]
    assert encode_prompt(tok, prompt, add_bos=False) == plain
    assert encode_prompt(tok, prompt, add_bos=True) == [tok.bos_token_id, *plain]


def test_full_disk_names_the_cache_and_ctrl_c_says_how_to_resume(tmp_path, monkeypatch, capsys):
    import builtins
    import errno

    from memefx.icl import cli as icl_cli
    from memefx.icl.engine import ResultCache, UserError

    store = ResultCache(tmp_path / "cache", 0, lambda row: True)
    real_open = builtins.open

    def full(path, mode="r", *args, **kwargs):
        if "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full)
    with pytest.raises(UserError, match=rf"cannot write answers to the cache {tmp_path}/cache.*No space left on device"):
        store.append([{"key": "k", "generated_text": "x"}])
    monkeypatch.setattr(builtins, "open", real_open)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("memefx.icl.engine.run", interrupted)  # Ctrl-C while answering
    prompts = tmp_path / "p.parquet"
    _prompts(1).to_parquet(prompts)
    code = icl_cli.main(["run", "--prompts", str(prompts), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o.parquet"),
                         "--engine.model", "nowhere"])
    assert code == 130
    assert "interrupted; the answers written so far are kept" in capsys.readouterr().err
