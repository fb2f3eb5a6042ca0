"""Tucker kernels: ``core_conv`` (the middle pass of ``three_pass``) and ``fused``
(all three convolutions in one launch). Each module exposes ``ptx_cases()`` for
the audit and ``phase_model(shape, config)``; phases are marked in the kernel
bodies with ``# phase: NAME`` comments."""
