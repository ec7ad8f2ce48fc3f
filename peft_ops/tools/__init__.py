"""The ``peft-ops`` command and what it runs: check, bench, aot builds and their PTX facts, the
roofline and the static estimate, launch plans, the accuracy harness the tests share."""
