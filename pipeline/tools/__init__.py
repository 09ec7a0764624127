"""Tools around the pipeline: ablations (ablate), studies and screens, inspect, the GPU check, benchmarks."""
