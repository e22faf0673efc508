"""The pretext methods: one module each, looked up by ``method=<name>`` (see ``base.Method``)."""

from pretext.methods.context_encoder import AutoencoderMethod, ContextEncoderMethod
from pretext.methods.kmeans_init import KMeansInit
from pretext.methods.random_init import RandomInit
from pretext.methods.relative_location import RelativeLocationMethod
from pretext.methods.rotation import RotationMethod
from pretext.methods.supervised import SupervisedMethod

METHODS = {
    "context_encoder": ContextEncoderMethod,
    "autoencoder": AutoencoderMethod,
    "random_init": RandomInit,
    "kmeans_init": KMeansInit,
    "supervised": SupervisedMethod,
    "rotation": RotationMethod,
    "relative_location": RelativeLocationMethod,
}
