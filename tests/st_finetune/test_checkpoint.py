"""Loading State-format checkpoints: keys, safety, bidirectionality, equivariance, errors."""

import pickle

import pytest
import torch

from st_finetune.model import load_pretrained, save_state_checkpoint
from st_finetune.model.checkpoint import read_var_dims

from .conftest import PERTS, batch_for, tiny_model


def test_checkpoint_is_in_states_format(model_folder):
    _, folder = model_folder
    with pytest.raises(pickle.UnpicklingError):  # the pickled MSELoss needs the allow-list
        torch.load(folder / "final.ckpt", weights_only=True)
    ckpt = torch.load(folder / "final.ckpt", weights_only=False)
    assert isinstance(ckpt["hyper_parameters"]["loss_fn"], torch.nn.MSELoss)
    assert "bidirectional_attention" not in ckpt["hyper_parameters"]["transformer_backbone_kwargs"]
    assert any(k.startswith("pert_encoder.3.") for k in ckpt["state_dict"])


@pytest.mark.parametrize("target", ["folder", "ckpt"])
def test_loads_the_same_model(model_folder, target):
    writer, folder = model_folder
    model, info = load_pretrained(folder if target == "folder" else folder / "final.ckpt")
    assert not model.training
    assert set(model.state_dict()) == set(writer.state_dict())
    batch = batch_for(writer.config)
    torch.testing.assert_close(model(batch), writer(batch), rtol=0, atol=0)
    assert info.pert_names == sorted(PERTS)
    assert info.config.input_dim == 12 and info.embed_key == "X_hvg"
    if target == "folder":
        assert info.gene_names == [f"g{i}" for i in range(12)]


def test_bidirectional_every_cell_sees_every_other(model_folder):
    model, _ = load_pretrained(model_folder[1])
    batch = batch_for(model.config, sets=2)
    base = model(batch)
    changed = dict(batch, ctrl_cell_emb=batch["ctrl_cell_emb"].clone())
    changed["ctrl_cell_emb"][5] += 1.0  # last cell but two of the first set
    diff = (model(changed) - base).abs().sum(-1)
    size = model.config.cell_set_len
    assert (diff[:size] > 0).all(), "a causal backbone leaves earlier cells unchanged"
    assert (diff[size:] == 0).all(), "sets must not see each other"


def test_permutation_equivariant_over_cells(model_folder):
    model, _ = load_pretrained(model_folder[1])
    batch = batch_for(model.config, sets=1)
    perm = torch.randperm(model.config.cell_set_len)
    permuted = {k: v[perm] for k, v in batch.items()}
    torch.testing.assert_close(model(permuted), model(batch)[perm], rtol=1e-5, atol=1e-6)


def test_unpadded_is_one_set_of_any_length(model_folder):
    model, _ = load_pretrained(model_folder[1])
    batch = batch_for(model.config, sets=1)
    short = {k: v[:5] for k, v in batch.items()}
    assert model(short, padded=False).shape == (5, 12)
    with pytest.raises(ValueError, match="padded=False"):
        model(short)


def test_relu_only_in_gene_space(tmp_path):
    gene = tiny_model(embed_key="X_hvg")
    emb = tiny_model(embed_key="X_state")
    batch = batch_for(gene.config)
    assert (gene(batch) >= 0).all()
    assert (emb(batch) < 0).any()


def test_missing_file_and_folder_errors(tmp_path):
    with pytest.raises(
        FileNotFoundError, match="no checkpoint or model folder at .* give a State run folder"
    ):
        load_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="final.ckpt"):
        load_pretrained(tmp_path / "empty")


def _rewrite(folder, edit):
    ckpt = torch.load(folder / "final.ckpt", weights_only=False)
    edit(ckpt)
    torch.save(ckpt, folder / "final.ckpt")


def test_missing_unexpected_and_mismatched_keys_are_named(model_folder):
    _, folder = model_folder
    key = next(k for k in torch.load(folder / "final.ckpt", weights_only=False)["state_dict"]
               if k.startswith("project_out.0.weight"))  # fmt: skip

    def edit(ckpt):
        sd = ckpt["state_dict"]
        sd["extra.weight"] = torch.zeros(2)
        sd[key] = torch.zeros(3, 3)
        del sd["basal_encoder.0.bias"]

    _rewrite(folder, edit)
    with pytest.raises(ValueError) as err:
        load_pretrained(folder)
    text = str(err.value)
    assert "missing key basal_encoder.0.bias (expected shape (32,))" in text
    assert "unexpected key extra.weight" in text
    assert f"shape mismatch for {key}: expected (32, 32), found (3, 3)" in text


def test_zeroed_token_table_and_gene_decoder_are_dropped(tmp_path):
    model = tiny_model("llama")
    state = dict(model.state_dict())
    state["transformer_backbone.embed_tokens.weight"] = torch.zeros(100, 32)
    state["gene_decoder.0.weight"] = torch.randn(5, 5)
    save_state_checkpoint(model, tmp_path / "m.ckpt", state_dict=state)
    loaded, _ = load_pretrained(tmp_path / "m.ckpt")
    batch = batch_for(model.config)
    torch.testing.assert_close(loaded(batch), model(batch))


class Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_arbitrary_pickles_are_refused(tmp_path, capsys):
    model = tiny_model("llama")
    save_state_checkpoint(model, tmp_path / "evil.ckpt", {"trap": Payload()})
    with pytest.raises(ValueError, match="allow-list"):
        load_pretrained(tmp_path / "evil.ckpt")
    assert "pwned" not in capsys.readouterr().out
    with open(tmp_path / "var_dims.pkl", "wb") as f:
        pickle.dump({"x": Payload()}, f)
    with pytest.raises(ValueError, match="refusing to unpickle builtins.print"):
        read_var_dims(tmp_path / "var_dims.pkl")


def test_var_dims_disagreeing_with_the_checkpoint(model_folder):
    _, folder = model_folder
    dims = read_var_dims(folder / "var_dims.pkl")
    dims["input_dim"] = 99
    with open(folder / "var_dims.pkl", "wb") as f:
        pickle.dump(dims, f)
    with pytest.raises(ValueError, match="input_dim=99"):
        load_pretrained(folder)
