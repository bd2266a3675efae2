import pytest
import torch

from pipelines.errors import ResourceError, resource_failure, resource_kind


@pytest.mark.parametrize("error, kind", [
    (MemoryError(), "host memory"),
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "GPU memory"),
    (RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"), "GPU memory"),  # older torch
    (RuntimeError("CUDA error: an illegal memory access was encountered"), "GPU"),
    (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm`"), "GPU"),
    (RuntimeError("DataLoader worker (pid 4321) is killed by signal: Killed. "), "host memory"),
    (RuntimeError("DataLoader worker (pid 4321) is killed by signal: Segmentation fault. "), None),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate memory: you tried "
                  "to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)"), "host memory"),
    (ValueError("input 3 must be a non-empty 1-D float array"), None),
    (RuntimeError("The size of tensor a (3) must match the size of tensor b (4)"), None),
    (ValueError("CUDA error in a caption is just text"), None),  # only a RuntimeError can be torch's
])
def test_machine_failures_are_told_from_bad_inputs(error, kind):
    assert resource_kind(error) == kind


def test_a_full_disk_is_found_behind_the_error_raised_while_handling_it():
    import errno

    from pipelines.errors import describe

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/out/run/ck.pt")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 100 vs 96")  # noqa: B904
    except RuntimeError as e:
        wrapped = e
    assert resource_kind(wrapped) == "disk space"
    assert describe("disk space", wrapped) == ("ran out of disk space",
                                               "OSError: [Errno 28] No space left on device: '/out/run/ck.pt'")
    assert resource_kind(OSError(errno.EDQUOT, "Disk quota exceeded")) == "disk space"
    assert resource_kind(RuntimeError("unexpected pos 100 vs 96")) is None


def test_resource_error_is_one_line():
    assert str(ResourceError("out of\n  memory:\tlower it")) == "out of memory: lower it"


def test_the_message_is_found_raised_chained_or_quoted_in_a_worker_failure():
    e = ResourceError("extract.image: out of GPU memory; lower workers")
    assert resource_failure(e) == "extract.image: out of GPU memory; lower workers"
    try:
        try:
            raise e
        except ResourceError as inner:
            raise RuntimeError("Pipeline failed") from inner
    except RuntimeError as outer:
        assert resource_failure(outer) == "extract.image: out of GPU memory; lower workers"
    # What Beam raises in the driver for a worker process: the worker's traceback as text, with the
    # step it ran appended to the message.
    quoted = RuntimeError(
        "Error processing instruction bundle_8. Original traceback is\nTraceback (most recent call last):\n"
        '  File "pipelines/extract.py", line 226, in _featurize\n'
        "pipelines.errors.ResourceError: extract.text: minilm on cuda:0 ran out of GPU memory featurizing 64 "
        "input(s) [while running 'Extract/ExtractText/BeamML_RunInference']\n\n")
    assert resource_failure(quoted) == "extract.text: minilm on cuda:0 ran out of GPU memory featurizing 64 input(s)"
    assert resource_failure(RuntimeError("Pipeline failed: ValueError: bad")) is None
