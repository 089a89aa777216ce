"""A full fine-tuning output takes its frozen components from the source repos' files: hard links where the file
system allows them, byte-for-byte copies where it does not (another file system), never re-serialised. Either way the
files are the source's bytes and the output outlives the source."""
import errno
import filecmp
import os
import shutil

import pytest

from kandinsky_finetune import output
from kandinsky_finetune.models import PRIOR_FLAG


def files_of(folder):
    return sorted(os.path.relpath(os.path.join(root, f), folder) for root, _, files in os.walk(folder) for f in files)


@pytest.mark.parametrize("links_work", [True, False], ids=["hard-linked", "copied"])
def test_frozen_components_are_the_source_files_and_outlive_them(tiny, tmp_path, monkeypatch, links_work):
    from ppdiffusers.transformers import CLIPVisionModelWithProjection

    repo, out = tmp_path / "prior", tmp_path / "out"
    shutil.copytree(tiny.prior, repo)
    out.mkdir()
    if not links_work:
        def cross_device(src, dst):
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(output.os, "link", cross_device)
    source = repo / "image_encoder"
    names = files_of(source)
    original = {name: (source / name).read_bytes() for name in names}
    size = sum(len(b) for b in original.values())

    writer = output.PipelineWriter(str(out))
    writer.take("image_encoder", str(repo), "image_encoder", output.PRIOR_COMPONENTS["image_encoder"], PRIOR_FLAG)

    taken = out / "image_encoder"
    assert files_of(taken) == names
    assert all(filecmp.cmp(source / n, taken / n, shallow=False) for n in names)
    assert all(os.path.samefile(source / n, taken / n) == links_work for n in names)
    # the log line: what cost new bytes and what did not
    assert (writer.written, writer.linked) == ((0, size) if links_work else (size, 0))
    assert writer.summary().endswith("hard-linked from the source repos")

    shutil.rmtree(repo)
    assert {n: (taken / n).read_bytes() for n in names} == original
    CLIPVisionModelWithProjection.from_pretrained(str(taken))
