"""Checks a plugin author runs from their own tests: the contract every pass keeps
(graphopt.testing.pass_contract.check_pass), the one graphopt's own passes are held to."""
