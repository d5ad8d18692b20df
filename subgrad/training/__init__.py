"""The trainer: ``subgrad train`` on CIFAR-10 or the user's images, built on the library
(:mod:`subgrad.optim`, :mod:`subgrad.models`, :mod:`subgrad.data`, :mod:`subgrad.run_folder`, :mod:`subgrad.capture`).
It never imports :mod:`subgrad.export`; ``subgrad run`` (:mod:`subgrad.pipeline`) joins the two.

==============  ==========================================================================
module          what
==============  ==========================================================================
config          every training setting, its defaults and its command-line flag (TrainConfig)
run_setup       a run's setup (device, data, model, optimizer), evaluation, checkpoints, resume
step            one training step with every input on the device (what --cuda-graph captures)
loop            train(): the loop, evaluation on schedule, Ctrl-C, the run folder's files
distributed     torchrun: byte-counted collectives, restart detection, the failure drill
==============  ==========================================================================
"""
