"""Tools around the training path: step benchmarks (bench), kernel and step profiles (profile), the meta-device cost
report (cost), the released code's parity recipe and state-dict names (parity, release, release_import), and the
assertion helpers shared by the tests and the profiler (testing). The trainer never imports from here."""
