"""Hostile or damaged artifacts: manifests that lie or are malformed, files that are not what they are listed as,
and GGUF files built to trip a reader. Every one is refused in one line (exit 2 from the CLI), nothing else;
property-based tests throw arbitrary manifests and byte-level mutations at the readers."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest
from conftest import assert_user_error, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pocketvlm.errors import ArtifactError
from pocketvlm.manifest import FILENAME, read_manifest, verify, write_manifest

QUESTION = "What color is the circle?"


@pytest.fixture
def model_copy(tiny_model, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(tiny_model, copy)
    return copy


def rewrite(folder, change):
    manifest = json.loads((folder / FILENAME).read_text())
    change(manifest)
    (folder / FILENAME).write_text(json.dumps(manifest))


@pytest.mark.parametrize("change, fragment", [
    (lambda m: m.update(files=None), "'files' is NoneType"),
    (lambda m: m.update(files="model.safetensors"), "'files' is str"),
    (lambda m: m.update(files=[]), "lists no files"),
    (lambda m: m["files"][0].pop("bytes"), "has no byte count"),
    (lambda m: m["files"][0].update(bytes="12"), "has no byte count"),
    (lambda m: m["files"][0].update(bytes=-1), "has no byte count"),
    (lambda m: m["files"][0].update(sha256="abc"), "has no sha256"),
    (lambda m: m["files"][0].update(path="../outside.txt"), "not a plain relative path"),
    (lambda m: m["files"][0].update(path="/etc/passwd"), "not a plain relative path"),
    (lambda m: m["files"][0].update(path="a//b"), "not a plain relative path"),
    (lambda m: m["files"].append(dict(m["files"][0])), "listed twice"),
    (lambda m: m["files"].append(7), "entry"),
    (lambda m: m.update(format=["hf"]), "format and quant must be strings"),
    (lambda m: m.update(schema=2), "not a pocketvlm manifest"),
])
def test_a_malformed_manifest_is_one_line(model_copy, change, fragment):
    rewrite(model_copy, change)
    assert_user_error(run_cli("ask", model_copy, QUESTION), fragment)


def test_an_unreadable_or_deeply_nested_manifest_is_one_line(model_copy):
    (model_copy / FILENAME).write_text("[" * 100_000 + "]" * 100_000)
    assert_user_error(run_cli("ask", model_copy, QUESTION), "manifest")
    (model_copy / FILENAME).write_bytes(b"\xff\xfe not json")
    assert_user_error(run_cli("ask", model_copy, QUESTION), "unreadable manifest")


def test_an_extra_file_is_refused(model_copy):
    (model_copy / "added.py").write_text("import os; os.system('echo pwned')")
    assert_user_error(run_cli("ask", model_copy, QUESTION), "added.py is not listed")


def test_a_listed_file_that_is_a_symlink_out_of_the_folder_is_refused(model_copy, tmp_path):
    outside = tmp_path / "outside.json"
    shutil.copy2(model_copy / "config.json", outside)
    (model_copy / "config.json").unlink()
    (model_copy / "config.json").symlink_to(outside)  # same bytes, same size, same hash: only the link differs
    assert_user_error(run_cli("ask", model_copy, QUESTION), "config.json is a link out of the artifact")


def test_changed_bytes_are_refused_whatever_the_size_and_time(model_copy):
    weights = model_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x40
    weights.write_bytes(bytes(data))
    assert_user_error(run_cli("ask", model_copy, QUESTION), "does not match its sha256")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                          lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(
                              ["path", "bytes", "sha256", "x"]), inner, max_size=4), max_leaves=12))
def test_any_files_value_is_either_valid_or_one_artifact_error(tmp_path, files):
    folder = tmp_path / "h"
    folder.mkdir(exist_ok=True)
    (folder / FILENAME).write_text(json.dumps({"schema": 1, "format": "hf", "quant": "fp32", "files": files}))
    try:
        manifest = read_manifest(folder)
    except ArtifactError as e:
        assert "\n" not in str(e)
        return
    # accepted: then every entry is a plain relative path with a size and a digest
    for entry in manifest["files"]:
        assert isinstance(entry["path"], str) and ".." not in entry["path"].split("/")
        assert isinstance(entry["bytes"], int) and len(entry["sha256"]) == 64
    with pytest.raises(ArtifactError):
        verify(folder, manifest)  # none of those files exists here


# ----------------------------------------------------------------------------------------- GGUF files

def small_gguf(path, *, alignment=None, extra=None):
    """A valid little GGUF (two f32 tensors) written with gguf-py itself."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_uint32("llama.embedding_length", 8)
    if alignment is not None:
        writer.add_string("general.alignment", alignment)
    for key, value in (extra or {}).items():
        writer.add_string(key, value)
    writer.add_tensor("token_embd.weight", np.ones((4, 8), np.float32))
    writer.add_tensor("output.weight", np.ones((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tensor_info_offset(data: bytes, name: bytes) -> int:
    """Where the (n_dims, dims..., type, offset) record of tensor NAME starts, after its name."""
    at = data.index(struct.pack("<Q", len(name)) + name)
    return at + 8 + len(name)


def test_the_reader_accepts_what_gguf_py_writes(tmp_path):
    from pocketvlm.formats.gguf_reader import read_gguf

    info = read_gguf(small_gguf(tmp_path / "ok.gguf"))
    assert [t.name for t in info.tensors] == ["token_embd.weight", "output.weight"]
    assert info.tensor_bytes == 2 * 4 * 8 * 4 and info.type_counts() == {"f32": 2}


def test_a_string_alignment_is_one_line(tmp_path):
    from pocketvlm.formats.gguf_reader import read_gguf

    with pytest.raises(ArtifactError, match="corrupt GGUF file") as e:
        read_gguf(small_gguf(tmp_path / "a.gguf", alignment="sixty-four"))
    assert "\n" not in str(e.value)


def test_an_unknown_tensor_type_is_an_error_never_zero_bytes(tmp_path):
    from pocketvlm.formats.gguf_reader import read_gguf

    path = small_gguf(tmp_path / "t.gguf")
    data = bytearray(path.read_bytes())
    at = tensor_info_offset(bytes(data), b"output.weight")
    n_dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, 999)  # the type id
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="tensor output.weight has unknown type id 999"):
        read_gguf(path)


def test_a_shape_whose_size_overflows_is_truncation_not_zero_bytes(tmp_path):
    from pocketvlm.formats.gguf_reader import read_gguf

    path = small_gguf(tmp_path / "s.gguf")
    data = bytearray(path.read_bytes())
    at = tensor_info_offset(bytes(data), b"output.weight")
    struct.pack_into("<QQ", data, at + 4, 1 << 40, 1 << 40)  # 2^80 elements: wraps a 64-bit byte count
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="truncated GGUF file .*tensor output.weight needs bytes up to"):
        read_gguf(path)


def test_a_bad_gguf_in_an_artifact_is_one_line_from_the_cli(tiny_model, tmp_path):
    pytest.importorskip("llama_cpp")
    art = tmp_path / "g"
    assert run_cli("export", tiny_model, "--to", "gguf", "--out", art, "--quiet").returncode == 0
    small_gguf(art / "model-f16.gguf", alignment="x")
    m = read_manifest(art)
    (art / FILENAME).unlink()
    write_manifest(art, **{k: m[k] for k in ("format", "quant", "source", "tools")}, gguf=m["gguf"])
    assert_user_error(run_cli("ask", art, QUESTION), "corrupt GGUF file")


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory):
    return small_gguf(tmp_path_factory.mktemp("gguf") / "base.gguf", extra={"general.name": "tiny"}).read_bytes()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_mutation_of_a_gguf_is_read_or_refused_in_one_line(tmp_path, gguf_bytes, data):
    from pocketvlm.formats.gguf_reader import GGUFInfo, read_gguf

    raw = bytearray(gguf_bytes)
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(4, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.one_of(st.none(), st.integers(4, len(raw))))
    path = tmp_path / "m.gguf"
    path.write_bytes(bytes(raw[:cut] if cut else raw))
    try:
        info = read_gguf(path)
    except ArtifactError as e:
        assert "\n" not in str(e)
        return
    assert isinstance(info, GGUFInfo)
    assert all(t.nbytes >= 0 for t in info.tensors) and info.size == path.stat().st_size
