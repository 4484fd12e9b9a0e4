"""Pure tensor maths: exact 1-D k-means (`kmeans1d`), vector k-means (`kmeans_vector`),
nearest-centroid assignment (`assign`) and LUT quantization (`lut`). No files, ranks or
progress bars here; import the function from its module."""
