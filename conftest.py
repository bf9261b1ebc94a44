# Thin on purpose: fixtures for the harness's own tests, and the case
# instances in cases/ as pytest items.  The logic lives in harness/.
pytest_plugins = ["harness.iotests.fixtures", "harness.iotests.pytest_cases"]
