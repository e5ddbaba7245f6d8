# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Developer tools of the bundle (studies, benchmarks), run from the bundle root as ``python -m tools.<module>``."""
