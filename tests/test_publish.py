"""publish: model card, dry run, verify gate, upload to a local fake Hub, post-upload check, failures."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import types
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub
import pytest
from hub_server import FakeHub
from huggingface_hub import ModelCard, constants
from huggingface_hub.utils import (
    _http,
    are_progress_bars_disabled,
    close_session,
    disable_progress_bars,
    enable_progress_bars,
)
from rich.console import Console

from bonsai_convert import verify_record
from bonsai_convert.errors import InputError, RemoteError, UsageError
from bonsai_convert.publish import build_model_card, plan_upload, publish, scrub
from bonsai_convert.schemas import validate

GOOD_TOKEN = "hf_GoodTestToken0123456789abcdef"
BAD_TOKEN = "hf_BadTestTokenZYXWVUTSRQ987654321"
REPO_ID = "bonsai-tester/klein-binary-iphone"
CHECKS = ["manifest", "files", "sizes", "sha256", "golden image PSNR"]
BIG = "transformer/model-00001-of-00001.safetensors"
# huggingface_hub's own LFS PUT passes a file object as `data=`, which httpx2 deprecates: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(autouse=True)
def hub_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Isolated huggingface_hub settings: online, no token, no telemetry, plain LFS uploads, private caches.

    huggingface_hub reads its environment once at import, so the parsed values in `constants` are patched too.
    Xet is disabled because huggingface_hub 2.4 chooses Xet client-side whenever hf_xet is installed, and the
    fake Hub serves the LFS protocol only (see tests/hub_server.py).
    """
    hf_home = tmp_path / "hf-home"
    for name in (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_ENDPOINT",
        "HF_OIDC_RESOURCE",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("BONSAI_CONVERT_CACHE", str(tmp_path / "bonsai-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(hf_home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(hf_home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    close_session()  # no pooled connection to an earlier test's server
    bars_were_off = are_progress_bars_disabled()
    disable_progress_bars()
    yield
    if not bars_were_off:
        enable_progress_bars()
    close_session()


@pytest.fixture
def no_backoff_sleep(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Make huggingface_hub's retry backoff instant; returns the waits it asked for."""
    waits: list[float] = []
    monkeypatch.setattr(_http, "time", types.SimpleNamespace(sleep=waits.append))
    return waits


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    # Small pages and parts so that tree pagination and the multipart LFS transfer are exercised.
    server = FakeHub(
        token=GOOD_TOKEN, tree_page_size=3, multipart_threshold=32 * 1024, part_size=16 * 1024, lifetime_s=60
    )
    with server:
        yield server
    assert server.unknown_requests == [], f"client hit endpoints the fake Hub lacks: {server.unknown_requests}"


def _report(bundle: Path, psnr: float | None = 41.237) -> dict:
    """A passing verify report as `bonsai-convert verify` writes it (the verify_report schema)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    report = {
        "bundle": str(bundle),
        "target": manifest["target"],
        "variant": manifest["variant"],
        "manifest_sha256": hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest(),
        "passed": True,
        "psnr_db": psnr,
        "generation_checked": psnr is not None,
        "checks": [{"name": name, "passed": True, "detail": "ok"} for name in CHECKS],
    }
    validate(report, "verify_report", "test report")
    return report


def _write_bundle(root: Path, target: str = "iphone", variant: str = "binary") -> dict:
    files = {
        "pipeline.json": json.dumps({"format_version": 1, "target": target, "variant": variant}).encode(),
        "transformer/config.json": json.dumps({"num_layers": 1, "quantization": {"bits": 1}}).encode(),
        BIG: b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + bytes(range(256)) * 280,  # ~70 kB: multipart
        "transformer/model.safetensors.index.json": json.dumps({"weight_map": {}}).encode(),
        "vae/diffusion_pytorch_model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + b"\x01" * 3000,
        "golden/golden.json": json.dumps({"prompt": "a bonsai", "seed": 0}).encode(),
        "golden/reference.png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + b"\x00" * 200,
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    manifest = {  # schema-valid (publish reads it with files.load_manifest), sizes of a real iPhone bundle
        "format_version": 2,
        "tool": {"name": "bonsai-convert", "version": "0.1.0", "dependencies": {}},
        "target": target,
        "profile": {"name": target, "memory_budget_bytes": 6_000_000_000, "default_width": 512, "default_height": 512},
        "variant": variant,
        "exact": True,
        "quantize": None,
        "base_model": "black-forest-labs/FLUX.2-klein-4B",
        "transformer_only": False,
        "source": {"label": "demo:binary", "kind": "diffusers", "files": []},
        "total_bytes": sum(len(data) for data in files.values()),
        "weights": {"low_bit": 3_700_000_000, "transformer": 3_875_000_000},
        "low_bit_tensors": 100,
        "weight_digests": {},
        "golden": "golden/golden.json",
        "memory": None,
        "layout": {"folders": {"transformer": "transformer"}, "dense_dtype": "BF16", "released_loaders": True},
        "files": [
            {"path": rel, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for rel, data in sorted(files.items())
        ],
        "components": {
            "transformer": {"bytes": 968_000_000, "fp16_bytes": 7_751_000_000, "reduction": 8.0},
            "text_encoder": {"bytes": 2_280_000_000, "fp16_bytes": 8_050_000_000, "reduction": 3.53},
            "vae": {"bytes": 168_000_000, "fp16_bytes": 168_000_000, "reduction": 1.0},
            "golden": {"bytes": 1_200_000},
        },
        "payload": {"bytes": 3_417_200_000, "fp16_bytes": 15_969_000_000, "reduction": 4.67},
        "bits_per_weight": {"low_bit_linears": 1.25, "transformer": 1.998},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    root = tmp_path / "bundle"
    root.mkdir()
    _write_bundle(root)
    return root


@pytest.fixture
def verified(bundle: Path) -> Path:
    verify_record.record_pass(bundle, _report(bundle))
    return bundle


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=200, color_system=None)


def _publish(bundle: Path, hub: FakeHub, **kwargs):
    kwargs.setdefault("token", GOOD_TOKEN)
    kwargs.setdefault("console", _quiet())
    return publish(bundle, REPO_ID, endpoint=hub.url, **kwargs)


def _sha(bundle: Path, rel: str) -> str:
    return hashlib.sha256((bundle / rel).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------- verify record


def test_verify_record_roundtrip_and_invalidation(bundle: Path, tmp_path: Path) -> None:
    report = _report(bundle)
    assert verify_record.find_pass(bundle) is None
    path = verify_record.record_pass(bundle, report)
    assert path.parent == tmp_path / "bonsai-cache" / "verified"
    assert path.stem == report["manifest_sha256"]
    assert verify_record.find_pass(bundle) == report
    with pytest.raises(ValueError):
        verify_record.record_pass(bundle, {**report, "passed": False})
    path.write_text(json.dumps({**report, "passed": False}))
    assert verify_record.find_pass(bundle) is None  # a stored report that did not pass does not count
    path.write_text(json.dumps({**report, "manifest_sha256": "0" * 64}))
    assert verify_record.find_pass(bundle) is None  # a report about another manifest does not count
    path.write_text("{not json")
    assert verify_record.find_pass(bundle) is None
    verify_record.record_pass(bundle, report)
    (bundle / "manifest.json").write_text((bundle / "manifest.json").read_text() + " ")
    assert verify_record.find_pass(bundle) is None  # another manifest, another key


# ------------------------------------------------------------------------------------------------ model card


@pytest.mark.parametrize(
    ("target", "variant", "library"),
    [
        ("iphone", "binary", "mlx"),
        ("mac", "ternary", "mlx"),
        ("cuda", "ternary", "diffusers"),
        ("packed", "binary", None),
    ],
)
def test_model_card_metadata(tmp_path: Path, target: str, variant: str, library: str | None) -> None:
    manifest = _write_bundle(tmp_path, target, variant)
    report = _report(tmp_path)
    card = build_model_card(manifest, report, REPO_ID)
    saved = tmp_path / "README.md"
    card.save(saved)
    loaded = ModelCard.load(saved)
    data = loaded.data.to_dict()
    assert data["license"] == "apache-2.0"
    assert data["base_model"] == "black-forest-labs/FLUX.2-klein-4B"
    assert data["base_model_relation"] == "quantized"
    assert data["pipeline_tag"] == "text-to-image"
    assert data.get("library_name") == library
    assert data["tags"][:3] == ["bonsai", variant, target]
    text = loaded.text
    assert "| transformer | 7.75 GB | 968.00 MB | 8.01× |" in text
    assert "| golden | — | 1.20 MB | — |" in text
    assert "| **Total payload** | **15.97 GB** | **3.42 GB** | **4.67×** |" in text
    assert "41.24 dB" in text and "Checks passed (5/5)" in text and "`golden image PSNR`" in text
    assert f"hf download {REPO_ID}" in text and "snapshot_download" in text and "**exact**" in text
    if target == "packed":
        assert "bonsai-convert pack" in text and "bonsai-convert generate" not in text
    else:
        assert "bonsai-convert generate" in text
    assert str(tmp_path) not in text, "the card must not carry local paths"
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", text), "the card must not carry dates"
    assert str(build_model_card(manifest, report, REPO_ID)) == str(card), "the card must be deterministic"


def test_model_card_defaults_and_unverified(tmp_path: Path) -> None:
    manifest = _write_bundle(tmp_path)
    del manifest["base_model"]
    card = build_model_card(manifest, None, REPO_ID)
    assert card.data.base_model == "black-forest-labs/FLUX.2-klein-4B"
    assert "without** a passing `bonsai-convert verify`" in card.text
    lossy = build_model_card({**manifest, "exact": False, "quantize": "absmean"}, _report(tmp_path, None), REPO_ID)
    assert "**lossy**" in lossy.text and "`absmean`" in lossy.text and "**not compared**" in lossy.text
    with pytest.raises(InputError, match="target"):
        build_model_card({**manifest, "target": "toaster"}, None, REPO_ID)


# --------------------------------------------------------------------------------------------- gates, dry run


def test_unverified_bundle_is_refused(bundle: Path, hub: FakeHub) -> None:
    with pytest.raises(InputError, match="no passing verify record"):
        _publish(bundle, hub)
    assert hub.requests == []


def test_file_changed_after_verify_is_refused(verified: Path, hub: FakeHub) -> None:
    data = bytearray((verified / BIG).read_bytes())
    data[-1] ^= 0xFF
    (verified / BIG).write_bytes(bytes(data))
    with pytest.raises(InputError, match=re.escape(BIG)):
        _publish(verified, hub)
    assert hub.requests == []


def test_dry_run_makes_no_request(verified: Path, hub: FakeHub, tmp_path: Path) -> None:
    out = io.StringIO()
    card_out = tmp_path / "card" / "README.md"
    result = _publish(verified, hub, dry_run=True, card_out=card_out, console=Console(file=out, width=200))
    assert hub.requests == []
    assert result.dry_run and result.commit_oid is None
    text = out.getvalue()
    for path, _ in plan_upload(verified, json.loads((verified / "manifest.json").read_text())):
        assert path in text
    assert "README.md" in text and f"{len(result.files)} files" in text and f"{result.total_bytes:,}" in text
    assert card_out.read_text() == result.card_text
    assert not (verified / "README.md").exists()
    with pytest.raises(UsageError, match="inside the bundle"):
        _publish(verified, hub, dry_run=True, card_out=verified / "README.md")


# ------------------------------------------------------------------------------------------------ upload


def test_publish_uploads_and_checks(verified: Path, hub: FakeHub) -> None:
    result = _publish(verified, hub)
    head = hub.head(REPO_ID)
    assert result.commit_oid == head.oid and result.verified
    manifest = json.loads((verified / "manifest.json").read_text())
    expected = {"manifest.json", "README.md", ".gitattributes"} | {f["path"] for f in manifest["files"]}
    assert set(head.files) == expected
    for entry in manifest["files"]:
        assert hub.file_content(REPO_ID, entry["path"]) == (verified / entry["path"]).read_bytes()
    assert hub.file_content(REPO_ID, "README.md").decode() == result.card_text
    assert head.files[BIG].lfs_oid == _sha(verified, BIG)  # binary files went through LFS
    assert head.files["pipeline.json"].lfs_oid is None  # small text files are regular git files
    assert not (verified / "README.md").exists()
    paths = [r.path for r in hub.requests]
    assert f"/api/models/{REPO_ID}/commit/main" in paths and "/api/validate-yaml" in paths
    assert sum(p.startswith(f"/api/models/{REPO_ID}/tree/") for p in paths) > 1  # paginated listing
    assert any("/part/" in p for p in paths)  # multipart transfer of the big file

    # Publishing the same bundle again is a no-op: nothing uploaded, no new commit, still checked.
    attempts = len(hub.lfs_put_attempts)
    again = _publish(verified, hub)
    assert again.commit_oid == head.oid and len(hub.lfs_put_attempts) == attempts

    # A file in the repo that is not in the bundle is reported, never deleted.
    api = huggingface_hub.HfApi(endpoint=hub.url, token=GOOD_TOKEN)
    api.upload_file(path_or_fileobj=b"old notes\n", path_in_repo="old/notes.txt", repo_id=REPO_ID)
    third = _publish(verified, hub)
    assert third.stale_remote_files == ["old/notes.txt"] and "old/notes.txt" in hub.head(REPO_ID).files


def test_publish_to_new_branch(verified: Path, hub: FakeHub) -> None:
    result = _publish(verified, hub, revision="v1", commit_message="bundle v1", private=True)
    assert hub.head(REPO_ID, "v1").oid == result.commit_oid and hub.head(REPO_ID, "v1").title == "bundle v1"
    assert set(hub.head(REPO_ID, "main").files) == {".gitattributes"}
    assert hub.repos[REPO_ID].private
    again = _publish(verified, hub, revision="v1")  # the branch exists now (409 is fine): no-op
    assert again.commit_oid == result.commit_oid


def test_fake_hub_read_endpoints_parse(verified: Path, hub: FakeHub) -> None:
    """Endpoints publish does not use but the brief's Hub must serve: paths-info, expanded tree, whoami."""
    _publish(verified, hub)
    api = huggingface_hub.HfApi(endpoint=hub.url, token=GOOD_TOKEN)
    big, folder = api.get_paths_info(REPO_ID, [BIG, "transformer", "absent.txt"], expand=True)
    assert isinstance(big, huggingface_hub.hf_api.RepoFile) and big.lfs is not None
    assert big.lfs.sha256 == _sha(verified, BIG) and big.last_commit is not None
    assert isinstance(folder, huggingface_hub.hf_api.RepoFolder)
    top = {e.path for e in api.list_repo_tree(REPO_ID, expand=True)}
    assert top == {
        ".gitattributes",
        "README.md",
        "golden",
        "manifest.json",
        "pipeline.json",
        "transformer",
        "vae",
    }
    assert api.whoami()["name"] == hub.user
    assert api.model_info(REPO_ID).sha == hub.head(REPO_ID).oid


def test_allow_unverified_publishes_with_a_warning_card(bundle: Path, hub: FakeHub) -> None:
    result = _publish(bundle, hub, allow_unverified=True)
    assert not result.verified
    assert "without** a passing" in hub.file_content(REPO_ID, "README.md").decode()


@pytest.mark.parametrize("how", ["bad-token-argument", "bad-token-env", "missing-token"])
def test_401_names_the_token_and_never_shows_it(
    verified: Path,
    hub: FakeHub,
    how: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    token = BAD_TOKEN if how == "bad-token-argument" else None
    if how == "bad-token-env":
        monkeypatch.setenv("HF_TOKEN", BAD_TOKEN)
    out = io.StringIO()
    with pytest.raises(RemoteError) as info:
        publish(verified, REPO_ID, endpoint=hub.url, token=token, console=Console(file=out, width=200))
    message = str(info.value)
    assert "\n" not in message and "401" in message
    if how == "missing-token":
        assert "no Hugging Face token found" in message
    else:
        assert "token" in message and "invalid" in message
    captured = capsys.readouterr()
    for text in (message, out.getvalue(), captured.out, captured.err, caplog.text):
        assert BAD_TOKEN not in text and GOOD_TOKEN not in text
    assert REPO_ID not in hub.repos


def test_connection_dropped_once_is_retried(verified: Path, hub: FakeHub, no_backoff_sleep: list[float]) -> None:
    oid = _sha(verified, "vae/diffusion_pytorch_model.safetensors")
    hub.drop_uploads(oid, times=1)
    result = _publish(verified, hub)
    assert hub.lfs_put_attempts.count(oid) == 2  # dropped, then retried by huggingface_hub's backoff
    assert no_backoff_sleep, "huggingface_hub should have waited before retrying"
    assert (
        hub.file_content(REPO_ID, "vae/diffusion_pytorch_model.safetensors")
        == (verified / "vae/diffusion_pytorch_model.safetensors").read_bytes()
    )
    assert result.commit_oid == hub.head(REPO_ID).oid


def test_interrupted_upload_resumes_on_rerun(verified: Path, hub: FakeHub, no_backoff_sleep: list[float]) -> None:
    oid = _sha(verified, BIG)
    hub.drop_uploads(oid, times=1000)  # the connection drops on every try: the run fails
    with pytest.raises(RemoteError) as info:
        _publish(verified, hub)
    assert BIG in str(info.value) and "re-run" in str(info.value)
    assert set(hub.head(REPO_ID).files) == {".gitattributes"}  # nothing committed
    stored = set(hub.repos[REPO_ID].lfs)
    assert _sha(verified, "vae/diffusion_pytorch_model.safetensors") in stored and oid not in stored

    hub.clear_drops()
    before = len(hub.lfs_put_attempts)
    result = _publish(verified, hub)
    assert set(hub.lfs_put_attempts[before:]) == {oid}  # only the missing object is sent again
    assert result.commit_oid == hub.head(REPO_ID).oid
    assert hub.file_content(REPO_ID, BIG) == (verified / BIG).read_bytes()


@pytest.mark.parametrize("path", ["vae/diffusion_pytorch_model.safetensors", "pipeline.json"])
def test_wrong_remote_hash_is_caught(verified: Path, hub: FakeHub, path: str) -> None:
    hub.corrupt_tree_sha256(path)
    with pytest.raises(RemoteError, match=re.escape(path)):
        _publish(verified, hub)


def test_fake_hub_logs_unknown_requests(hub: FakeHub, caplog: pytest.LogCaptureFixture) -> None:
    api = huggingface_hub.HfApi(endpoint=hub.url, token=GOOD_TOKEN)
    with pytest.raises(huggingface_hub.errors.HfHubHTTPError):
        api.list_repo_commits("bonsai-tester/nothing")
    assert hub.unknown_requests and "UNHANDLED REQUEST" in caplog.text
    hub.unknown_requests.clear()


def test_scrub_removes_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "env-secret-value")
    text = scrub(f"a {BAD_TOKEN}\nb Bearer xyz c env-secret-value d hf_{'A' * 34} e", token=BAD_TOKEN)
    assert text == "a *** b *** c *** d *** e"
