"""Publishing through the real huggingface_hub client against a local Hub-compatible server (no mocks).

The server (tests/fixtures/hub_server.py) implements the endpoints the client calls: repo creation, preupload,
the Git LFS batch API (basic and multipart transfers), commit, repo info, tree listing and resolve.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, snapshot_download
from huggingface_hub.errors import HfHubHTTPError
from fixtures.hub_server import local_hub  # noqa: F401  (fixture)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hfcompress import HfCompressConfig, compress, compressed_modules
from hfcompress.hub import push_to_hub, save_compressed
from hfcompress.testing.models import tiny_llama

CONFIG = HfCompressConfig(bits=4, group_size=32)
BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _same_compressed_tensors(a, b) -> None:
    ma, mb = compressed_modules(a), compressed_modules(b)
    assert ma.keys() == mb.keys() and ma
    for name in ma:
        ta, tb = ma[name].compressed_tensors(), mb[name].compressed_tensors()
        assert ta.keys() == tb.keys()
        for key in ta:
            assert torch.equal(ta[key], tb[key]), f"{name}.{key}"


@pytest.fixture
def folder(tmp_path):
    model = compress(tiny_llama(), HfCompressConfig(bits=4, group_size=32))
    return save_compressed(model, tmp_path / "tiny-int4", base_model=BASE, license="apache-2.0")


def test_model_push_to_hub_round_trip(local_hub, tmp_path):
    model = compress(tiny_llama(), CONFIG)
    commit = model.push_to_hub("tester/tiny-int4", tags=["demo"])
    assert commit.oid == HfApi(endpoint=local_hub.url).model_info("tester/tiny-int4").sha

    files = local_hub.files("tester/tiny-int4")
    assert {"config.json", "model.safetensors", "README.md", "recipe.yaml"} <= set(files)
    assert files["model.safetensors"].lfs and not files["config.json"].lfs
    assert any("/part/" in path for path in local_hub.requests("PUT")), "the safetensors went through multipart LFS"
    card = ModelCard(files["README.md"].data.decode())
    assert {"hfcompress", "rtn", "4-bit", "demo"} <= set(card.data.tags)
    assert card.data.library_name == "transformers"

    reloaded = AutoModelForCausalLM.from_pretrained("tester/tiny-int4", cache_dir=tmp_path / "cache")
    _same_compressed_tensors(model, reloaded)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)

    # A reloaded model pushes with the hfcompress card as well (not transformers' generic one).
    reloaded.push_to_hub("tester/tiny-int4-again")
    again = ModelCard(local_hub.files("tester/tiny-int4-again")["README.md"].data.decode())
    assert "hfcompress" in again.data.tags
    assert load_file(snapshot_download("tester/tiny-int4-again", cache_dir=tmp_path / "c2") + "/model.safetensors").keys() == (
        load_file(snapshot_download("tester/tiny-int4", cache_dir=tmp_path / "c3") + "/model.safetensors").keys()
    )


def test_folder_push_download_is_byte_identical(local_hub, folder, tmp_path):
    commit = push_to_hub(folder, "tester/folder-int4", private=True)
    assert commit.commit_url.startswith(local_hub.url)
    local = snapshot_download("tester/folder-int4", cache_dir=tmp_path / "cache")
    for name in ("model.safetensors", "config.json", "recipe.yaml"):
        assert (folder / name).read_bytes() == open(f"{local}/{name}", "rb").read(), name
    # The folder's hfcompress card is re-rendered for the repo; the folder itself is left as it was.
    card = ModelCard.load("tester/folder-int4")
    assert card.data.base_model == BASE and card.data.base_model_relation == "quantized"
    assert card.data.license == "apache-2.0"
    assert 'from_pretrained("tester/folder-int4")' in card.text
    assert 'from_pretrained("<this repo id or folder>")' in (folder / "README.md").read_text()
    info = HfApi().model_info("tester/folder-int4")
    assert info.private and info.card_data.base_model == BASE

    # Pushing the unchanged folder again uploads nothing new.
    puts = len(local_hub.requests("PUT"))
    push_to_hub(folder, "tester/folder-int4")
    assert len(local_hub.requests("PUT")) == puts


def test_push_renders_card_when_asked_without_touching_the_folder(local_hub, folder):
    before = (folder / "README.md").read_bytes()
    push_to_hub(folder, "tester/rendered", license="mit", tags=["extra"])
    assert (folder / "README.md").read_bytes() == before
    card = ModelCard(local_hub.files("tester/rendered")["README.md"].data.decode())
    assert card.data.license == "mit" and "extra" in card.data.tags and card.data.base_model == BASE
    assert 'from_pretrained("tester/rendered")' in card.text

    push_to_hub(folder, "tester/no-card", card=False)
    assert "README.md" not in local_hub.files("tester/no-card")


def test_hand_written_readme_is_uploaded_untouched(local_hub, folder):
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# My notes\n")
    push_to_hub(folder, "tester/hand-written")
    assert local_hub.files("tester/hand-written")["README.md"].data == (folder / "README.md").read_bytes()
    push_to_hub(folder, "tester/re-rendered", card=True)
    card = ModelCard(local_hub.files("tester/re-rendered")["README.md"].data.decode())
    assert card.data.license == "mit" and "hfcompress" in card.data.tags


def test_push_to_branch_and_pull_request(local_hub, folder):
    push_to_hub(folder, "tester/branches", revision="dev")
    assert "model.safetensors" in local_hub.files("tester/branches", revision="dev")
    assert "model.safetensors" not in local_hub.files("tester/branches", revision="main")
    commit = push_to_hub(folder, "tester/branches", create_pr=True)
    assert commit.pr_url.endswith("/discussions/1")
    assert "model.safetensors" in local_hub.files("tester/branches", revision="refs/pr/1")


def test_push_refuses_bad_input_before_contacting_the_hub(local_hub, folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        push_to_hub(broken, "tester/broken")
    dense = tmp_path / "dense"
    tiny_llama().save_pretrained(dense)
    with pytest.raises(ValueError, match="not an hfcompress checkpoint"):
        push_to_hub(dense, "tester/dense")
    with pytest.raises(ValueError, match="namespace/name"):
        push_to_hub(folder, "no-namespace")
    with pytest.raises(ValueError, match="not compressed by hfcompress"):
        push_to_hub(tiny_llama(), "tester/dense-model")
    assert local_hub.requests("POST") == []


def test_wrong_token_is_refused(local_hub, folder):
    with pytest.raises(HfHubHTTPError) as err:
        push_to_hub(folder, "tester/denied", token="hf_wrong")
    assert err.value.response.status_code == 401
    assert ("model", "tester/denied") not in local_hub.state.repos


def test_hub_rejects_broken_card_metadata(local_hub, folder):
    text = (folder / "README.md").read_text().replace("base_model_relation: quantized", "base_model_relation: compressed")
    with pytest.raises(ValueError, match="base_model_relation"):
        push_to_hub(folder, "tester/bad-card", card=ModelCard(text))
