"""The method's shared code: data, models, clustering, whitening, assignments, probes, pictures,
artifacts and their checks, the run layout, params and their schema, errors, atomic I/O."""
