# A package, so that pytest imports these modules as torch_compile_tests.* and their
# names cannot collide with same-named test modules under tests/.
