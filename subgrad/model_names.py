"""The built-in models by name, importable without torch (the CLI's choices): name -> class in
:mod:`subgrad.models`, which builds them."""

MODEL_CLASSES = {"lenet": "LeNet", "resnet20": "ResNet20", "localnet": "LocalNet"}
MODEL_NAMES = tuple(MODEL_CLASSES)
