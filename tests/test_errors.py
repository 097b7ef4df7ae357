"""engineforge.errors' one-line causes: what a recorded reason shows of a long error text."""

from engineforge.errors import first_line, key_line

DYNAMO = """LoweringException: NotImplementedError: Pointwise
  target: aten.mul.Tensor
  args[0]: TensorBox(StorageBox(...))

Set TORCHDYNAMO_VERBOSE=1 for the internal stack trace (please do this especially if you're \
reporting a bug to PyTorch). For even more developer context, set TORCH_LOGS="+dynamo"
"""

CHILD_STDERR = """W1123 01:49:01 torch/utils/cpp_extension.py:183] No CUDA runtime is found
Error: aoti_torch_cpu_addmm_out(buf45, buf44) API call failed at /tmp/x/wrapper.cpp
Traceback (most recent call last):
  File "<string>", line 11, in <module>
RuntimeError: mat1 and mat2 must have the same dtype, but got Float and Half
Exception raised from meta at aten/src/ATen/native/LinearAlgebra.cpp:195 (most recent call first):
frame #0: c10::Error::Error(c10::SourceLocation) + 0x9d (0x7f1a in libc10.so)
frame #29: __libc_start_main + 0x85 (0x7f1abf845305 in /lib/x86_64-linux-gnu/libc.so.6)
"""


def test_key_line_names_the_error_not_the_footer_or_the_frames():
    assert key_line(DYNAMO) == "LoweringException: NotImplementedError: Pointwise"
    assert key_line(CHILD_STDERR) == ("RuntimeError: mat1 and mat2 must have the same dtype, "
                                      "but got Float and Half")


def test_key_line_without_an_exception_line_is_the_last_line():
    assert key_line("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : no Conv(22)\n") == \
        "[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : no Conv(22)"
    assert key_line("step 1 ok\nstep 2 broke\n") == "step 2 broke"
    assert key_line("") == "no message"
    assert len(key_line("ValueError: " + "x" * 1000)) == 300


def test_first_line():
    err = ValueError("\n  bad value\nmore detail")
    assert first_line(err) == "ValueError: bad value"
    assert first_line(err, 5, typed=False) == "bad v"
