"""What a run shows: report.json and report.html, the Pareto front, static cost (params, FLOPs) and `graphopt inspect`."""
