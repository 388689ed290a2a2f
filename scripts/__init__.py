"""The simulators, the benchmark and the soak test of webqq; installed as webqq_scripts (the demo uses
webqq_scripts.smartqq_sim). Each module is also a script: python scripts/<name>.py --help."""
