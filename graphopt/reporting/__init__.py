"""What a run shows: report.json, report.html, the Pareto front, static cost, `graphopt inspect`."""
