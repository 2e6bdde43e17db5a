"""The paper's Vilio models (U, O, V) against the oracle the reference code produced, through memefx's own path."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch

from memefx.callbacks.midas import MIDASCallback
from memefx.callbacks.run_directory import RunDirectory
from memefx.cli import main
from memefx.data.datamodule import MemeDataModule
from memefx.models.backbones import build_backbone
from memefx.models.backbones.vilio import uniter_gather_index
from memefx.models.module import MemeClassifier
from memefx.schema import IMAGE, PAD, SPECIAL, TEXT
from tests.test_midas_callback import _compare, _explicit_table
from tests.vilio_fixtures import CONFIGS, FAMILIES, MAX_SEQ_LEN, oracle_dir, oracle_root

CONFIG_DIR = "configs/experiment"


def _close(got: torch.Tensor, ref: torch.Tensor, what: str) -> float:
    """Largest error, asserted within 1e-5 of the reference tensor's largest magnitude."""
    err = float((got.detach().double() - ref.double()).abs().max())
    assert err <= 1e-5 * float(ref.abs().max()) + 1e-12, (what, err, float(ref.abs().max()))
    return err


def _oracle_batch(family: str, tmp_path, **data_kwargs):
    """The oracle's batch as memefx builds it: jsonl reader, region TSV, WordPiece from bert/vocab.txt, collate."""
    root = oracle_root(family, tmp_path / "data")
    dm = MemeDataModule(root=str(root), val_split="dev_seen", image_side="regions",
                        region_features=str(root / "regions.tsv"), tokenizer=str(root / "bert"), batch_size=4,
                        max_length=16, **data_kwargs)
    dm.setup("validate")
    return root, dm, next(iter(dm.val_dataloader()))


def _backbone(family: str, root, **kwargs):
    seq = MAX_SEQ_LEN[family]
    extra = {"max_seq_len": seq} if seq else {}
    return build_backbone(FAMILIES[family], bert=str(root / "bert"), checkpoint=str(root / "state_dict.pt"),
                          **extra, **kwargs).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_attentions_and_gradients_equal_the_oracle(family, tmp_path):
    out_ref = torch.load(oracle_dir(family) / "outputs.pt")
    inputs = torch.load(oracle_dir(family) / "inputs.pt")
    root, _, batch = _oracle_batch(family, tmp_path)
    # memefx's own reading of the inputs equals what Vilio's loaders fed the model
    assert batch["input_ids"].tolist() == [t + [0] * (batch["input_ids"].shape[1] - len(t)) for t in inputs["token_ids"]]
    assert torch.equal(batch["region_features"], inputs["feats"])
    if family != "V":  # V's loader hands raw pixel boxes (which BertV ignores); U and O normalized ones
        assert torch.equal(batch["region_boxes"], inputs["boxes"][..., :4])
    backbone = _backbone(family, root)
    out = backbone(batch, output_attentions=True)
    errors = {"logits": _close(out.logits, out_ref["logits"], "logits")}
    probs = out.logits.softmax(-1)
    errors["probs"] = _close(probs, out_ref["probs"], "probs")
    grads = torch.autograd.grad(probs[:, 1].sum(), out.attentions)  # samples do not interact: one backward
    for layer, attention in enumerate(out.attentions):
        errors[f"attention{layer}"] = _close(attention, out_ref["attentions"][layer], f"attention {layer}")
        errors[f"gradient{layer}"] = _close(grads[layer], out_ref["attention_grads"][layer], f"gradient {layer}")
        errors[f"attattr{layer}"] = _close(attention * grads[layer], out_ref["attattr"][layer], f"attattr {layer}")
    with torch.no_grad():
        hidden, _ = backbone.encode(*backbone._embed(batch)[:2])
        for layer, h in enumerate(hidden):
            errors[f"hidden{layer}"] = _close(h, out_ref["hidden_states"][layer], f"hidden state {layer}")
        fast = backbone(batch)  # SDPA: the path of every forward that captures nothing
    errors["sdpa_logits"] = _close(fast.logits, out_ref["logits"], "SDPA logits")
    print(family, {k: f"{v:.1e}" for k, v in errors.items()})  # the note quotes these (pytest -s)


def test_segments_follow_each_family_layout(tmp_path):
    root, _, batch = _oracle_batch("U", tmp_path)
    segments = _backbone("U", root)(batch).segments
    # U gathers each sample's regions right after its own text: row 1 has 3 words, so regions start at 5
    assert segments[1].tolist() == [SPECIAL, TEXT, TEXT, TEXT, SPECIAL] + [IMAGE] * 5 + [PAD] * 4
    assert segments[2].tolist() == [SPECIAL] + [TEXT] * 7 + [SPECIAL] + [IMAGE] * 5
    for family in ("O", "V"):
        root, _, batch = _oracle_batch(family, tmp_path / family)
        segments = _backbone(family, root)(batch).segments
        assert segments.shape[1] == 16 + 5  # text padded to max_seq_len, then the regions
        assert segments[1].tolist() == [SPECIAL, TEXT, TEXT, TEXT, SPECIAL] + [PAD] * 11 + [IMAGE] * 5


def test_uniter_gather_index_with_unequal_region_counts():
    index, mask = uniter_gather_index(torch.tensor([3, 5]), torch.tensor([2, 1]), max_text=5, max_regions=2)
    assert index.tolist() == [[0, 1, 2, 5, 6, 5], [0, 1, 2, 3, 4, 5]]
    assert mask.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]


@pytest.mark.parametrize("family", FAMILIES)
def test_full_size_state_dict_maps_onto_the_saved_keys(family, tmp_path):
    """Built on the meta device at the paper's sizes, each backbone's state dict is the saved checkpoint's,
    key for key and shape for shape (after Vilio's own ``n_averaged``/``module.`` handling)."""
    spec = json.loads((oracle_dir(family) / "keys_full_size.json").read_text())
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps(spec["bert_config"]))
    with torch.device("meta"):
        backbone = build_backbone(FAMILIES[family], bert=str(bert))
    ours = {k: [list(v.shape), str(v.dtype)] for k, v in backbone.state_dict().items()}
    saved = {k.removeprefix("module."): v for k, v in spec["saved_keys"].items() if k != "n_averaged"}
    assert ours == saved
    assert sum(int(np.prod(s)) for s, d in ours.values() if d == "torch.float32") == spec["n_float_elements_saved"]


def test_checkpoint_layouts_and_refusals(tmp_path):
    root = oracle_root("V", tmp_path / "v")
    swa = torch.load(root / "state_dict.pt")
    assert "n_averaged" in swa
    backbone = build_backbone("vilio_visualbert", bert=str(root / "bert"), checkpoint=str(root / "state_dict.pt"))
    assert backbone.checkpoint_layout == "swa"
    plain = tmp_path / "plain.pt"  # the same model saved without --swa: model.* / classifier.*
    torch.save({k.removeprefix("module."): v for k, v in swa.items() if k != "n_averaged"}, plain)
    again = build_backbone("vilio_visualbert", bert=str(root / "bert"), checkpoint=str(plain))
    assert again.checkpoint_layout == "contrib"
    assert all(torch.equal(a, b) for a, b in zip(backbone.state_dict().values(), again.state_dict().values()))
    with pytest.raises(ValueError, match=r"not a Vilio U checkpoint.*missing keys: classifier\.0\.bias.*img_embeddings.*"
                                         r"unexpected keys: .*model\.layer_weights\)\. Found layout 'swa'"):
        build_backbone("vilio_uniter", bert=str(root / "bert"), checkpoint=str(root / "state_dict.pt"))
    bigger = tmp_path / "bert_big"
    bigger.mkdir()
    config = json.loads((root / "bert" / "config.json").read_text())
    (bigger / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    with pytest.raises(ValueError, match=r"shapes differ.*intermediate\.dense\.weight \(128, 32\) \(model|"
                                         r"shapes differ.*\(64, 32\) \(model \(128, 32\)\)"):
        build_backbone("vilio_visualbert", bert=str(bigger), checkpoint=str(root / "state_dict.pt"))
    with pytest.raises(ValueError, match="bert is required"):
        build_backbone("vilio_oscar")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        build_backbone("vilio_oscar", bert=str(tmp_path))


@pytest.mark.parametrize("family", FAMILIES)
def test_midas_tables_equal_per_sample_autograd(family, tmp_path):
    root, dm, batch = _oracle_batch(family, tmp_path)
    seq = MAX_SEQ_LEN[family]
    model = MemeClassifier(backbone=FAMILIES[family], miate_bootstrap=10, backbone_args={
        "bert": str(root / "bert"), "checkpoint": str(root / "state_dict.pt"), **({"max_seq_len": seq} if seq else {})})
    dm.hparams.test_split = "dev_seen"
    trainer = L.Trainer(default_root_dir=tmp_path / "run", accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[MIDASCallback(stages=["test"]), RunDirectory()])
    trainer.test(model, datamodule=dm)
    got = pd.read_parquet(tmp_path / "run" / "midas" / "test_ckpt_epochinit.parquet")
    assert set(got.block) == {"text", "image", "cross", "special"}
    gradients = got[got.score == "gradient"]
    assert (gradients.groupby("block")["sum"].apply(lambda s: s.abs().max()) > 0).all()  # every block attributed
    _compare(got, _explicit_table(model, [batch], "test", -1))
    miate = json.loads((tmp_path / "run" / "miate" / "dev_seen.json").read_text())
    assert miate["shared_image"]["n_strata"] == 1 and miate["shared_text"]["n_strata"] == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_user_chain_predict_then_miate_on_the_fixture(family, tmp_path, capsys):
    """The README's chain: a Vilio checkpoint + TSV + memes -> predictions equal to the reference's hateful
    probability, then memefx miate on them."""
    root = oracle_root(family, tmp_path / "data")
    run = tmp_path / "run"
    options = ["--config", f"{CONFIG_DIR}/{CONFIGS[family]}.yaml", "--data.root", str(root),
               "--data.region_features", str(root / "regions.tsv"), "--data.tokenizer", str(root / "bert"),
               "--model.backbone_args.bert", str(root / "bert"), "--model.backbone_args.checkpoint",
               str(root / "state_dict.pt"), "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false"]
    assert main(["predict", *options, "--data.predict_split", "dev_seen"]) == 0
    predictions = pd.read_parquet(run / "predictions" / "dev_seen.parquet")
    assert predictions.id.tolist() == ["00101", "00102", "00202", "00303"]
    reference = torch.load(oracle_dir(family) / "outputs.pt")["probs"][:, 1].double().numpy()
    assert np.abs(predictions.p_hateful.to_numpy() - reference).max() <= 1e-5
    capsys.readouterr()
    assert main(["miate", "--predictions", str(run / "predictions" / "dev_seen.parquet"), "--confounders",
                 str(root / "confounders.parquet"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    by_kind = result["miate"] if "miate" in result else result
    image = by_kind["shared_image"]
    assert image["n_strata"] == 1
    assert image["mean"] == pytest.approx(reference[0] - reference[1], abs=1e-6)
    # the README's next steps: test (metrics, miATE, MIDAS of the checkpoint's weights), then report
    assert main(["test", *options, "--data.test_split", "[dev_seen]"]) == 0
    assert json.loads((run / "miate" / "dev_seen.json").read_text())["shared_text"]["mean"] == pytest.approx(
        reference[2] - reference[3], abs=1e-6)
    assert len(pd.read_parquet(run / "midas" / "test_ckpt_epochinit.parquet"))
    assert main(["report", str(run)]) == 0
    assert (run / "report" / "report.md").is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_paper_midas_procedure_reproduces_the_reference(family, tmp_path):
    """The paper's own procedure stays reachable: last-layer attention injected into every layer, alpha =
    0..0.9, summed, min-max in row pairs, / 10. With the hateful probability as target it equals the oracle's
    ``ig_cls1_*``; with the reference's target (a summed softmax, identically 1) the gradient is noise."""
    from memefx.attribution.paper_midas import paper_midas

    out_ref = torch.load(oracle_dir(family) / "outputs.pt")
    root, _, batch = _oracle_batch(family, tmp_path)
    backbone = _backbone(family, root)
    ours = paper_midas(backbone, batch, steps=10, target="hateful")
    assert torch.equal(ours["alphas"], out_ref["midas_alphas"].to(ours["alphas"].dtype))
    assert float((ours["gradient"] - out_ref["ig_cls1_gradient"]).abs().max()) <= 1e-7
    assert float((ours["attattr"] - out_ref["ig_cls1_attattr"]).abs().max()) <= 1e-7
    constant = paper_midas(backbone, batch, steps=10)
    assert constant["gradient"].shape == out_ref["midas_gradient"].shape
    assert float(constant["gradient"].abs().max()) < 1e-8 and float(out_ref["midas_gradient"].abs().max()) < 1e-8
    assert float(ours["gradient"].abs().max()) > 1e-5  # the hateful probability does depend on the attention


def test_linear_schedule_equals_transformers_linear_warmup():
    """``scheduler: linear`` is the schedule Vilio trains with (transformers' get_linear_schedule_with_warmup)."""
    from transformers import get_linear_schedule_with_warmup

    from memefx.models.module import linear_warmup_decay

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=7, num_training_steps=70)
    for step in range(75):
        assert linear_warmup_decay(step, 7, 70) == pytest.approx(reference.lr_lambdas[0](step), abs=1e-12)
