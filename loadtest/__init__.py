"""Load tests that prove the contract's invariants at peak (locust scenarios, a runner that
brings the service up and prints PASS or FAIL) and a benchmark against reference designs."""
