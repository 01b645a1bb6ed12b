"""The benchmark harness (`python -m quasar.bench ...`): acceptance (tau per Spec-Bench task),
speed (ops / step / e2e / project) and the kernel sweeps (`python -m quasar.bench.ops`). No
runtime module imports this package."""
