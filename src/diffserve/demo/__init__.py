"""Training and evaluation code of the built-in demo model: the scene generator and captions
(`scenes`), the plain-PyTorch reference model and sampler the training script trains (`reference`),
and the shape detector that scores samples (`detector`).

None of it is needed to run the model: the shipped pipeline (diffserve.models.demo_dit) imports none
of these modules. The training script, the benchmarks, the tests and the conformance reference do.
"""
