"""Hub publishing: the exact folder and card that would be uploaded, and the upload through a fake Hub HTTP server."""

from __future__ import annotations

import base64
import json
import logging
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from conftest import ARCHS, fresh, peft_kwargs
from huggingface_hub import EvalResult, HfApi, ModelCard, constants, metadata_load
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import _http
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from hf_elastic import NLSConfig, get_supernet
from hf_elastic.hub import (
    CardInfo,
    build_model_card,
    check_model_card,
    detect_artifact_kind,
    measure_sparsity,
    prepare_upload_folder,
    push_to_hub,
)

TOKEN = "hf_TESTtokenThatMustNeverLeak0123456789"
BASE_ID = "HuggingFaceTB/SmolLM2-135M"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32
ACCURACY = EvalResult(
    task_type="text-generation",
    dataset_type="openai/gsm8k",
    dataset_name="GSM8K",
    dataset_split="test",
    metric_type="accuracy",
    metric_value=0.412,
)


# ---------------------------------------------------------------------------------------------------- artefacts


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory) -> dict:
    """A real sub-adapter, a real merged checkpoint (half of each decoder weight zeroed) and a fake OpenVINO dir."""
    root = tmp_path_factory.mktemp("artefacts")
    arch = ARCHS["llama"]
    base = arch.build()
    config = NLSConfig(rank_choices=[8, 6, 4], rank_groups=arch.rank_groups, **peft_kwargs(arch))
    model = get_peft_model(fresh(base), config)
    sn = get_supernet(model)
    with torch.no_grad():
        for module in sn.lora_modules.values():
            module.lora_B["default"].weight.normal_()

    adapter = sn.extract_adapter("median", root / "adapter")
    (adapter / "pareto.csv").write_text("name,params,accuracy\nmax,25000,0.45\nmedian,23000,0.44\nmin,21000,0.40\n")
    (adapter / "pareto.png").write_bytes(PNG)

    merged = root / "merged"
    sliced = sn.extract_model("min")
    with torch.no_grad():
        for name, param in sliced.named_parameters():
            if ".layers." in name and param.ndim == 2:
                param.view(-1)[::2] = 0.0
    sliced.save_pretrained(merged)
    subnet = {"config": sn.space.min_config(), **sn.count("min"), "max": sn.count("max")}
    (merged / "elastic_subnet.json").write_text(json.dumps(subnet))

    ov = root / "openvino"
    ov.mkdir()
    (ov / "openvino_model.xml").write_text("<?xml version='1.0'?><net name='fake'/>")
    (ov / "openvino_model.bin").write_bytes(b"\x00" * 64)
    shutil.copy(merged / "config.json", ov / "config.json")
    (ov / "openvino_config.json").write_text(json.dumps({"quantization_config": {"bits": 4, "group_size": 128}}))
    (ov / "openvino_tokenizer.xml").write_text("<net/>")
    return {"adapter": adapter, "merged": merged, "openvino": ov, "base": base, "model": model, "sn": sn}


def card_info(**kwargs) -> CardInfo:
    defaults = {
        "base_model": BASE_ID,
        "method": "shears",
        "license": "apache-2.0",
        "datasets": ["openai/gsm8k"],
        "hyperparameters": {"learning_rate": 3e-4, "num_train_epochs": 3},
        "eval_results": [ACCURACY],
    }
    return CardInfo(**(defaults | kwargs))


def listing(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("kind", ["adapter", "merged", "openvino"])
def test_detects_artifact_kind(artefacts, kind):
    assert detect_artifact_kind(artefacts[kind]) == kind


def test_detection_errors_are_clear(tmp_path, artefacts):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        detect_artifact_kind(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no sub-network artefact.*adapter_config.json"):
        detect_artifact_kind(tmp_path)
    broken = tmp_path / "adapter"
    broken.mkdir()
    shutil.copy(artefacts["adapter"] / "adapter_config.json", broken)
    with pytest.raises(FileNotFoundError, match="lacks adapter_model.safetensors or adapter_model.bin"):
        detect_artifact_kind(broken)
    ov = tmp_path / "ov"
    ov.mkdir()
    (ov / "openvino_model.xml").write_text("<net/>")
    with pytest.raises(FileNotFoundError, match="OpenVINO.*lacks openvino_model.bin, config.json"):
        detect_artifact_kind(ov)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(artefacts["merged"] / "config.json", sharded)
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model-1-of-2.safetensors"}})
    )
    with pytest.raises(FileNotFoundError, match="missing weight shards"):
        detect_artifact_kind(sharded)


# ---------------------------------------------------------------------------------------------------- cards


def test_adapter_folder_is_exactly_what_is_uploaded(tmp_path, artefacts):
    source = artefacts["adapter"]
    out = prepare_upload_folder(source, tmp_path / "upload", card_info(max_size=artefacts["sn"].count("max")))
    assert listing(out) == {
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "elastic_subnet.json",
        "pareto.csv",
        "pareto.png",
    }
    for name in listing(out) - {"README.md"}:
        assert (out / name).read_bytes() == (source / name).read_bytes()

    meta = metadata_load(out / "README.md")
    assert meta["base_model"] == BASE_ID
    assert meta["base_model_relation"] == "adapter"
    assert meta["library_name"] == "peft"
    assert meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["openai/gsm8k"]
    assert meta["pipeline_tag"] == "text-generation"
    assert {"hf-elastic", "nas", "shears", "nls", "lora"} <= set(meta["tags"])
    card = ModelCard.load(out / "README.md")
    (result,) = card.data.eval_results
    assert (result.dataset_type, result.dataset_split, result.metric_type) == ("openai/gsm8k", "test", "accuracy")
    assert result.metric_value == pytest.approx(0.412)
    assert check_model_card(card)["model-index"][0]["name"] == "SmolLM2-135M-shears-subnet"

    text = card.text
    subnet = json.loads((source / "elastic_subnet.json").read_text())
    for name, value in subnet["config"].items():
        assert f'"{name}": {value}' in text
    ratio = subnet["params"] / artefacts["sn"].count("max")["params"]
    assert f"{ratio:.1%} of the maximal sub-network" in text
    assert "| median | 23000 | 0.44 |" in text
    assert "![Pareto front of the sub-network search](pareto.png)" in text
    assert 'PeftModel.from_pretrained(base, "REPO_ID")' in text
    assert f'AutoModelForCausalLM.from_pretrained("{BASE_ID}")' in text
    assert "arXiv:2404.10934" in text and "| learning_rate | 0.0003 |" in text
    assert "| text-generation | GSM8K | test | accuracy | 0.412 |" in text

    # stock peft loads the folder and reproduces the sub-network
    sn = artefacts["sn"]
    sn.activate("median")
    ids = ARCHS["llama"].batch()["input_ids"]
    loaded = PeftModel.from_pretrained(fresh(artefacts["base"]), out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, artefacts["model"](input_ids=ids).logits)


def test_merged_folder_measures_sparsity_and_loads(tmp_path, artefacts):
    source = artefacts["merged"]
    assert measure_sparsity(source) == pytest.approx(0.5)
    out = prepare_upload_folder(source, tmp_path / "upload", card_info(method="lonas", eval_results=[]))
    assert listing(out) == {
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "elastic_subnet.json",
    }
    meta = metadata_load(out / "README.md")
    assert (meta["library_name"], meta["base_model_relation"]) == ("transformers", "finetune")
    assert {"lonas", "sparse"} <= set(meta["tags"]) and "model-index" not in meta
    text = (out / "README.md").read_text()
    assert "50.00% of the weights in the linear layers are zero (measured on the published weights)" in text
    assert 'AutoModelForCausalLM.from_pretrained("REPO_ID")' in text and "aclanthology.org/2024.lrec-main.940" in text
    assert "| MACs per token |" in text and "No evaluation results were recorded." in text
    AutoModelForCausalLM.from_pretrained(out)


def test_openvino_card_reads_quantization(tmp_path, artefacts):
    source = artefacts["openvino"]
    info = card_info(method="sqft-qa-sparsepeft", sparsity=0.5, tags=["edge"], repo_id="me/tiny-ov")
    out = prepare_upload_folder(source, tmp_path / "upload", info)
    assert listing(out) == {p.name for p in source.iterdir()} | {"README.md"}
    meta = metadata_load(out / "README.md")
    assert meta["base_model_relation"] == "quantized" and "library_name" not in meta
    assert {"openvino", "int4", "sqft", "qa-sparsepeft", "sparse", "edge"} <= set(meta["tags"])
    text = (out / "README.md").read_text()
    assert "| Weights | INT4, group size 128 |" in text
    assert "4-bit integers with one scale per group of 128 weights" in text
    assert 'OVModelForCausalLM.from_pretrained("me/tiny-ov")' in text and "arXiv:2410.03750" in text


def test_int4_checkpoint_card_reads_reports_and_search(tmp_path, artefacts):
    source = tmp_path / "int4"
    source.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(artefacts["merged"] / name, source)
    quant = {"format": "hf_elastic.QuantLinear", "method": "gptq", "bits": 4, "group_size": 32, "symmetric": False}
    (source / "quantization_config.json").write_text(json.dumps(quant))
    (source / "sparsity_report.json").write_text(json.dumps({"pattern": "2:4", "total_sparsity": 0.5, "modules": {}}))
    (source / "search.csv").write_text(
        "index,sources,key,loss,params,pareto,0.rank.q_proj\n0,max,a,2.5,30000,1,8\n1,random,b,2.9,28000,0,6\n"
        "2,min,c,2.7,21000,1,4\n"
    )
    (source / "search.png").write_bytes(PNG)
    out = prepare_upload_folder(source, tmp_path / "upload", card_info(method="sqft-qa-sparsepeft", eval_results=[]))
    assert listing(out) == {p.name for p in source.iterdir()} | {"README.md"}
    meta = metadata_load(out / "README.md")
    assert meta["base_model_relation"] == "quantized" and "library_name" not in meta
    assert {"int4", "sparse", "qa-sparsepeft"} <= set(meta["tags"])
    text = (out / "README.md").read_text()
    assert "| Weights | INT4, group size 32 |" in text
    assert "4-bit integers (GPTQ, asymmetric) with one scale per group of 32 weights" in text
    assert "50.00% of the weights in the linear layers are zero (2:4 pattern, from `sparsity_report.json`)" in text
    assert 'load_quantized(snapshot_download("REPO_ID"))' in text and "from_pretrained(" not in text
    assert "(the 2 Pareto-optimal of 3 evaluated sub-networks, from `search.csv`)" in text
    assert "| index | sources | key | loss | params |" in text and "| 2 | min | c | 2.7 | 21000 |" in text
    assert "| 1 | random |" not in text and "![Pareto front of the sub-network search](search.png)" in text


def test_card_info_overrides_files_and_validates():
    with pytest.raises(ValueError, match="method='bogus' is not known"):
        CardInfo(method="bogus")
    with pytest.raises(ValueError, match=r"sparsity=50 is outside \[0, 1\]"):
        CardInfo(method="nls", sparsity=50)
    with pytest.raises(ValueError, match="bits must be an integer"):
        CardInfo(method="nls", bits=0)
    with pytest.raises(ValueError, match="group_size must be a positive integer or -1"):
        CardInfo(method="nls", group_size=0)
    with pytest.raises(ValueError, match="not a Hub model id"):
        CardInfo(method="nls", base_model="/home/me/llama/")
    with pytest.raises(ValueError, match="Required keys: task_type"):
        CardInfo(method="nls", eval_results=[{"metric_value": 1.0}])
    with pytest.raises(ValueError, match=r"subnet_config\['0.rank'\] must be an integer"):
        CardInfo(method="nls", subnet_config={"0.rank": "big"})
    info = CardInfo(method="nls", eval_results=[dict(ACCURACY.__dict__)], tags="x")
    assert info.eval_results == [ACCURACY] and info.tags == ["x"]
    tensor_metric = dict(ACCURACY.__dict__, metric_value=torch.tensor(0.25))
    assert CardInfo(method="nls", eval_results=[tensor_metric]).eval_results[0].metric_value == 0.25
    with pytest.raises(ValueError, match="accuracy on GSM8K is nan"):
        CardInfo(method="nls", eval_results=[dict(ACCURACY.__dict__, metric_value=float("nan"))])


def test_card_needs_a_hub_base_model(artefacts):
    # the tiny adapter records no base model, so the card cannot link one
    with pytest.raises(ValueError, match="Cannot tell the base model"):
        build_model_card(artefacts["adapter"], CardInfo(method="nls"))


def test_offline_card_validation_rejects_broken_metadata(artefacts):
    card = build_model_card(artefacts["adapter"], card_info())
    data = check_model_card(str(card))
    assert data["model-index"][0]["results"][0]["metrics"][0]["value"] == pytest.approx(0.412)
    with pytest.raises(ValueError, match="no '---' YAML metadata block"):
        check_model_card("# just text")
    with pytest.raises(ValueError, match="Invalid `model_index`"):
        check_model_card("---\nmodel-index:\n- name: x\n  results:\n  - foo: 1\n---\n")
    with pytest.raises(ValueError, match="base_model_relation='derived'"):
        check_model_card(f"---\nbase_model: {BASE_ID}\nbase_model_relation: derived\n---\n")
    with pytest.raises(ValueError, match="is not a Hub id"):
        check_model_card("---\nbase_model: ./local/dir\n---\n")


def test_prepare_is_atomic(tmp_path, artefacts, monkeypatch):
    out = tmp_path / "upload"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        prepare_upload_folder(artefacts["adapter"], out, card_info())

    import hf_elastic.hub as hub

    calls = []

    def flaky_place(src, dst, link):
        calls.append(src)
        if len(calls) == 2:
            raise OSError("disk full")
        shutil.copy2(src, dst)

    monkeypatch.setattr(hub, "_place", flaky_place)
    with pytest.raises(OSError, match="disk full"):
        prepare_upload_folder(artefacts["adapter"], out, card_info(), overwrite=True)
    assert listing(out) == {"old.txt"} and sorted(p.name for p in tmp_path.iterdir()) == ["upload"]
    monkeypatch.undo()
    prepare_upload_folder(artefacts["adapter"], out, card_info(), overwrite=True)
    assert "old.txt" not in listing(out) and "README.md" in listing(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["upload"]
    with pytest.raises(ValueError, match="must not overlap"):
        prepare_upload_folder(artefacts["adapter"], artefacts["adapter"] / "hub", card_info())
    with pytest.raises(ValueError, match="would overwrite"):
        prepare_upload_folder(
            artefacts["adapter"], tmp_path / "x", card_info(), extra_files={"README.md": out / "README.md"}
        )


# ---------------------------------------------------------------------------------------------------- upload


class FakeHub:
    """Answers huggingface_hub's HTTP calls like the Hub does and records them; files are committed inline."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.fail_create = False

    def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/api/agent-harnesses":  # huggingface_hub telemetry, not part of the upload
            return httpx.Response(404)
        self.requests.append(request)
        if path == "/api/repos/create":
            if self.fail_create:
                return httpx.Response(403, json={"error": "You don't have the rights to create a model under me"})
            body = json.loads(request.content)
            return httpx.Response(200, json={"url": f"https://huggingface.co/{body['organization']}/{body['name']}"})
        if path == "/api/validate-yaml":
            return httpx.Response(200, json={"errors": [], "warnings": []})
        if "/preupload/" in path:
            files = json.loads(request.content)["files"]
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]
            return httpx.Response(200, json={"files": modes})
        if "/branch/" in path:
            return httpx.Response(200, json={})
        if path.endswith("/discussions") and request.method == "POST":
            return httpx.Response(200, json={"num": 1})
        if path.endswith("/discussions/1"):
            return httpx.Response(200, json=discussion_details())
        if "/commit/" in path:
            return httpx.Response(
                200, json={"commitUrl": "https://huggingface.co/me/tiny/commit/" + "a" * 40, "commitOid": "a" * 40}
            )
        return httpx.Response(404, json={"error": f"unexpected {request.method} {path}"})

    def calls(self) -> list[tuple[str, str]]:
        return [(r.method, r.url.path) for r in self.requests]

    def committed_files(self) -> dict[str, bytes]:
        (commit,) = [r for r in self.requests if "/commit/" in r.url.path]
        lines = [json.loads(line) for line in commit.content.splitlines()]
        return {x["value"]["path"]: base64.b64decode(x["value"]["content"]) for x in lines if x["key"] == "file"}


def discussion_details() -> dict:
    return {
        "title": "Upload",
        "num": 1,
        "author": {"name": "me"},
        "createdAt": "2026-01-01T00:00:00.000Z",
        "status": "draft",
        "repo": {"name": "me/tiny", "type": "model"},
        "isPullRequest": True,
        "changes": {"base": "refs/heads/main"},
        "filesWithConflicts": [],
        "events": [],
    }


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace huggingface_hub's HTTP client by one whose transport is `FakeHub` (the real request hooks stay)."""
    hub = FakeHub()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_DEBUG", True)  # log every request as curl, to check the token stays out
    previous = _http._GLOBAL_CLIENT_FACTORY
    _http.set_client_factory(
        lambda: httpx.Client(
            transport=httpx.MockTransport(hub.handler), event_hooks={"request": [_http.hf_request_event_hook]}
        )
    )
    yield hub
    _http.set_client_factory(previous)


def assert_no_token(caplog, capfd, *texts: str) -> None:
    out, err = capfd.readouterr()
    for text in (caplog.text, out, err, *texts):
        assert TOKEN not in text
        assert TOKEN[3:] not in text


def test_push_uploads_the_prepared_folder(tmp_path, artefacts, fake_hub, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    source = artefacts["adapter"]
    url = push_to_hub(
        source, "me/tiny", card_info=card_info(), token=TOKEN, private=True, commit_message="Add sub-network"
    )
    assert url == "https://huggingface.co/me/tiny/commit/" + "a" * 40
    assert fake_hub.calls() == [
        ("POST", "/api/repos/create"),
        ("POST", "/api/validate-yaml"),
        ("POST", "/api/models/me/tiny/preupload/main"),
        ("POST", "/api/models/me/tiny/commit/main"),
    ]
    create = json.loads(fake_hub.requests[0].content)
    assert create == {"name": "tiny", "organization": "me", "visibility": "private", "type": "model"}
    assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in fake_hub.requests)
    header = json.loads(fake_hub.requests[-1].content.splitlines()[0])
    assert header["value"]["summary"] == "Add sub-network"

    expected = prepare_upload_folder(source, tmp_path / "expected", card_info(repo_id="me/tiny"))
    files = fake_hub.committed_files()
    assert set(files) == listing(expected)
    assert all(files[name] == (expected / name).read_bytes() for name in files)
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == BASE_ID and "hf-elastic" in card.data.tags
    assert card.data.eval_results[0].metric_value == pytest.approx(0.412)
    assert 'PeftModel.from_pretrained(base, "me/tiny")' in card.text
    assert json.loads(fake_hub.requests[1].content)["content"] == files["README.md"].decode()
    assert "authorization: <TOKEN>" in caplog.text  # huggingface_hub's curl debug log ran, with the token masked
    assert_no_token(caplog, capfd)


def test_push_to_branch_and_pull_request(artefacts, fake_hub):
    push_to_hub(artefacts["merged"], "me/tiny", card_info=card_info(), token=TOKEN, revision="v1")
    calls = fake_hub.calls()
    assert ("POST", "/api/models/me/tiny/branch/v1") in calls and calls[-1] == (
        "POST",
        "/api/models/me/tiny/commit/v1",
    )
    assert json.loads(fake_hub.requests[0].content)["visibility"] == "public"

    fake_hub.requests.clear()
    url = push_to_hub(artefacts["merged"], "me/tiny", card_info=card_info(), token=TOKEN, create_pr=True)
    assert url == "https://huggingface.co/me/tiny/discussions/1"
    assert ("POST", "/api/models/me/tiny/discussions") in fake_hub.calls()
    assert fake_hub.calls()[-1] == ("POST", "/api/models/me/tiny/commit/refs/pr/1")


def test_dry_run_makes_no_calls(tmp_path, artefacts, fake_hub, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("dry run must not call the Hub")

    monkeypatch.setattr(HfApi, "create_repo", forbidden)
    monkeypatch.setattr(HfApi, "upload_folder", forbidden)
    folder = push_to_hub(
        artefacts["openvino"], "me/tiny-ov", card_info=card_info(), token=TOKEN, dry_run=True, local_dir=tmp_path / "d"
    )
    assert folder == tmp_path / "d" and "openvino_model.xml" in listing(folder)
    assert 'OVModelForCausalLM.from_pretrained("me/tiny-ov")' in (folder / "README.md").read_text()
    default = push_to_hub(artefacts["adapter"], "me/tiny", card_info=card_info(), dry_run=True)
    assert default.name == "tiny" and (default / "README.md").is_file()
    shutil.rmtree(default.parent)
    assert fake_hub.requests == []


def test_bad_inputs_fail_before_any_call(tmp_path, artefacts, fake_hub):
    for repo_id in ("a/b/c", "bad--name", "", "me/x.git"):
        with pytest.raises(ValueError, match="Invalid repo_id"):
            push_to_hub(artefacts["adapter"], repo_id, card_info=card_info(), token=TOKEN)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        push_to_hub(tmp_path / "missing", "me/tiny", card_info=card_info(), token=TOKEN)
    with pytest.raises(ValueError, match="create_pr=True opens a pull request against main"):
        push_to_hub(artefacts["adapter"], "me/tiny", card_info=card_info(), create_pr=True, revision="dev")
    assert fake_hub.requests == []


def test_hub_errors_do_not_leak_the_token(artefacts, fake_hub, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    fake_hub.fail_create = True
    with pytest.raises(HfHubHTTPError, match="403") as exc:
        push_to_hub(artefacts["adapter"], "me/tiny", card_info=card_info(), token=TOKEN)
    assert fake_hub.calls() == [("POST", "/api/repos/create"), ("GET", "/api/models/me/tiny")]  # exists? no
    assert_no_token(caplog, capfd, str(exc.value), repr(exc.value))
