from pathlib import Path

import pytest

from st_finetune.config import help_text, load_config

CONFIGS = Path(__file__).parents[2] / "configs"


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nlora:\n  r: 4\ndata:\n  paths: [a.h5ad]\n")
    cfg = load_config(path, ["lora.r=8", "mhc.enable=true", "mhc.layers=[0,2]",
                             "training.lr=1e-4", "data.timepoint_key=null"])  # fmt: skip
    assert cfg.name == "x" and cfg.lora.r == 8 and cfg.mhc.enable and cfg.mhc.layers == [0, 2]
    assert cfg.training.lr == 1e-4 and cfg.data.timepoint_key is None
    assert cfg.data.paths[0].endswith("a.h5ad") and cfg.data.paths[0].startswith("/")


def test_seed_defaults():
    t = load_config().training
    assert (t.lr, t.weight_decay, t.warmup_steps, t.gradient_clip, t.max_epochs, t.batch_size) == (
        5e-5, 0.01, 100, 1.0, 5, 16)  # fmt: skip
    assert load_config().data.cell_set_len == 256 and t.loss == "energy"


@pytest.mark.parametrize(
    "override,match",
    [
        ("lora.rank=8", "did you mean 'lora.r'"),
        ("traning.lr=1", "did you mean 'training.lr'"),
        ("training.lr=fast", "training.lr must be a number"),
        ("mhc.enable=maybe", "mhc.enable must be true or false"),
        ("training.loss=l1", "training.loss must be one of"),
        ("lr", "key=value"),
    ],
)
def test_bad_keys_and_values(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  epochs: 3\n")
    with pytest.raises(ValueError, match="did you mean 'training.max_epochs'"):
        load_config(path)


@pytest.mark.parametrize(
    "text,match",
    [("data:\n  paths: [a.h5ad, [b\n", r"not valid YAML \(.* at line 3, column 1\); quote"),
     ("- data\n- lora\n", "must hold a mapping of keys")],
)  # fmt: skip
def test_a_broken_yaml_file_is_named_with_its_line(tmp_path, text, match):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_config(path)


@pytest.mark.parametrize("value,expected", [("[19]", [19]), ("[10, 19]", [10, 19]),
                                            ("19", ["19"]), ("10,19", ["10", "19"])])  # fmt: skip
def test_list_overrides_are_lists(value, expected):
    # data.holdout_values=[19] on the command line was kept as the string "[19]", then read as
    # the values '[', '1', '9', ']'
    cfg = load_config(None, [f"data.holdout_values={value}", "data.paths=[a.h5ad,b.h5ad]"])
    assert cfg.data.holdout_values == expected
    assert [p.rsplit("/", 1)[-1] for p in cfg.data.paths] == ["a.h5ad", "b.h5ad"]


def test_mhc_extra_is_checked_when_read():
    import torch

    cfg = load_config(None, ["mhc.extra={coeff_dtype: float64, fused_backward: true}"])
    config = cfg.mhc.mhc_config()
    assert config.coeff_dtype == torch.float64 and config.fused_backward
    with pytest.raises(ValueError, match="space after the colon"):  # YAML: {key:value} is one key
        load_config(None, ["mhc.extra={fused_backward:true}"])
    with pytest.raises(ValueError, match=r"\['n_streams'\] are not MHCConfig fields it may set"):
        load_config(None, ["mhc.extra={n_streams: 2}"])
    with pytest.raises(ValueError, match="coeff_dtype must be torch.float32 or torch.float64"):
        load_config(None, ["mhc.extra={coeff_dtype: float16}"])


def test_training_numbers_are_checked_when_read():
    for override, match in [("training.lr=-1", "lr must be > 0"),
                            ("training.gradient_clip=-1", "gradient_clip must be >= 0")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            load_config(None, [override])


def test_help_lists_every_key_with_its_default():
    text = help_text()
    for key in ("data.pert_col = 'condition'", "lora.r = 16", "mhc.sinkhorn_iters = 20",
                "training.lr = 5e-05", "trainer.strategy = 'auto'"):  # fmt: skip
        assert key in text


@pytest.mark.parametrize("path", [p for p in sorted(CONFIGS.glob("*.yaml"))
                                  if not p.name.startswith("compare")], ids=lambda p: p.name)  # fmt: skip
def test_shipped_run_configs_load(path):
    cfg = load_config(path)
    assert cfg.name == path.stem and cfg.data.embed_key == "X_state"
