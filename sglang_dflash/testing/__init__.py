"""What tests, benchmarks and the CPU lane use that users do not: models built in code
(:mod:`.devmodels`) and local SGLang servers as subprocesses (:mod:`.local_server`)."""
