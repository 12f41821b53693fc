"""Few-shot regression of quadratics with a small network of one's own: distmaml's user-code example.

From this folder (``examples/``)::

    distmaml train --set model.name=polyfit.nets:make --set data.family=polyfit.tasks:Quadratics \\
        --set meta.steps=300 --workers 2 --out runs/polyfit

The package travels to the Ray workers through the job's runtime environment;
nothing is installed on them.
"""
