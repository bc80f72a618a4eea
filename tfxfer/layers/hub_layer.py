"""`HubLayer`: a TF-Hub SavedModel as a Keras 3 layer.

`tensorflow_hub.KerasLayer` is a tf-keras (Keras 2) layer: a Keras 3 functional model
rejects it. `HubLayer` is the Keras 3 replacement. It loads the SavedModel with
`tf.saved_model.load`, calls the model's `__call__` (or a named signature) inside `call()`,
and wraps every variable that function reads in a `keras.Variable` that *aliases* it (the
same `tf.Variable`, no copy). So Keras sees the hub weights as the layer's own: they count in
`summary()`, obey `layer.trainable`, are skipped by the optimizer while frozen, and are
written to and restored from `.keras` files.

A `.keras` file cannot hold the SavedModel's graph, only its weights, so the layer's config
stores the handle and reloading rebuilds the layer from it: the SavedModel must still be at
that local path (or reachable at that URL) when the file is loaded. Because loading a
SavedModel runs graph code named by the file, `keras.saving.load_model` refuses such files
unless called with `safe_mode=False`, as Keras does for its own `TFSMLayer`.

`tensorflow_hub` is imported only where a handle is resolved or loaded: it imports tf-keras.
"""

from __future__ import annotations

import inspect
import os
import socket
from typing import Any

import keras
import tensorflow as tf

from tfxfer.errors import TfxferError, WeightsError

# Per socket operation, not per download: a model of hundreds of MB still downloads, but an
# offline machine whose packets are dropped fails in seconds instead of hanging on connect.
NETWORK_TIMEOUT_SECONDS = 15.0
REMOTE_PREFIXES = ("http://", "https://")


def resolve_hub_handle(handle: str | os.PathLike[str]) -> str:
    """Turns a TF-Hub handle into a local SavedModel directory, downloading it if needed.

    A URL (tfhub.dev or a Kaggle model page) goes through `tensorflow_hub.resolve`, which
    downloads into `TFHUB_CACHE_DIR` once and reuses the cache afterwards, also offline.
    Anything else is a directory (local or `gs://`) that must hold `saved_model.pb`.

    Args:
        handle: str or path. A local SavedModel directory, or a `https://tfhub.dev/...`
            or `https://www.kaggle.com/models/...` URL.

    Returns:
        The directory that holds `saved_model.pb`.

    Raises:
        WeightsError: the directory holds no SavedModel, or the URL cannot be fetched.
    """
    handle = os.fspath(handle)
    if handle.startswith(REMOTE_PREFIXES):
        return _download(handle)
    path = os.path.expanduser(handle)
    if not any(
        tf.io.gfile.exists(os.path.join(path, name))
        for name in ("saved_model.pb", "saved_model.pbtxt")
    ):
        what = (
            "a directory without saved_model.pb" if tf.io.gfile.isdir(path) else "no such directory"
        )
        raise WeightsError(
            f"Expected `handle` to be a SavedModel directory (holding saved_model.pb) or a "
            f"https://tfhub.dev/ or https://www.kaggle.com/models/ URL. Received: "
            f"handle={handle!r}, which is {what}. Download the model, unpack it, and pass the "
            f"directory that holds saved_model.pb."
        )
    return path


def _download(handle: str) -> str:
    # Imported here: tensorflow_hub imports tf-keras on import, and we only need its resolver.
    import tensorflow_hub as hub

    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(NETWORK_TIMEOUT_SECONDS)
    try:
        return hub.resolve(handle)
    except (OSError, ValueError) as error:
        raise WeightsError(
            f"Could not fetch the TF-Hub model {handle!r} ({type(error).__name__}: {error}). "
            f"If this machine is offline, download the model on a machine that is online "
            f"(the model page on tfhub.dev or kaggle.com has a download link), unpack the "
            f"archive, copy it here and pass the directory that holds saved_model.pb as the "
            f"handle. Models fetched once are cached in $TFHUB_CACHE_DIR and then load offline."
        ) from error
    finally:
        socket.setdefaulttimeout(previous_timeout)


def _load_saved_model(handle: str) -> tuple[Any, str]:
    import tensorflow_hub as hub

    path = resolve_hub_handle(handle)
    try:
        # hub.load on a local path is tf.saved_model.load plus the tags legacy TF1 Hub
        # modules need.
        return hub.load(path), path
    except Exception as error:  # A corrupt or foreign file can raise many types.
        raise WeightsError(
            f"Could not load the SavedModel at {path!r} (from handle {handle!r}): "
            f"{type(error).__name__}: {error}"
        ) from error


def _concrete_functions(function: Any) -> list[Any]:
    if hasattr(function, "concrete_functions"):
        return list(function.concrete_functions)
    return [function]


def _variables_read_by(function: Any) -> tuple[list[tf.Variable], list[tf.Variable]]:
    """Returns the (trainable, non-trainable) `tf.Variable`s a restored function reads."""
    trainable: dict[int, tf.Variable] = {}
    frozen: dict[int, tf.Variable] = {}
    for concrete in _concrete_functions(function):
        for variable in concrete.trainable_variables:
            trainable.setdefault(id(variable), variable)
        for variable in concrete.variables:
            if id(variable) not in trainable:
                frozen.setdefault(id(variable), variable)
    return list(trainable.values()), list(frozen.values())


def _input_spec(function: Any) -> tf.TensorSpec | None:
    """The spec of the one tensor input of a restored function, if it has exactly one."""
    specs: list[tf.TensorSpec] = []
    for concrete in _concrete_functions(function):
        args, kwargs = concrete.structured_input_signature
        specs.extend(
            spec for spec in tf.nest.flatten((args, kwargs)) if isinstance(spec, tf.TensorSpec)
        )
    return specs[0] if specs else None


@keras.saving.register_keras_serializable(package="tfxfer")
class HubLayer(keras.layers.Layer):
    """A TF-Hub SavedModel as a Keras 3 layer.

    The Keras 3 counterpart of `tensorflow_hub.KerasLayer`, which only works in tf-keras
    models. The SavedModel's variables become the layer's weights (aliased, not copied), so
    freezing, fine-tuning and `.keras` weight files work as for any Keras layer; the graph
    itself is reloaded from `handle` when a `.keras` file is loaded.

    A model that follows the TF-Hub "reusable SavedModel" convention is called through its
    `__call__`, with `training=True` only while the layer is trainable and training: a
    frozen hub model runs its batch norms in inference mode, as frozen Keras layers do.
    Legacy models (TF1 Hub format) are called through a named `signature`; those cannot be
    fine-tuned, so their weights are always non-trainable. The layer computes in float32
    whatever the global dtype policy, because the SavedModel's graph has fixed dtypes.

    Args:
        handle: str. A local SavedModel directory, or a tfhub.dev / Kaggle URL (see
            `resolve_hub_handle`).
        signature: str or None. Call this signature (e.g. `"default"`,
            `"serving_default"`) instead of the model's `__call__`. Defaults to `None`:
            use `__call__` when the model has one, else `"serving_default"`.
        output_key: str or None. Which entry to return when the model returns a dict.
            Defaults to `None`: a dict with one entry, or with a `"default"` entry, returns
            that entry; any other dict needs `output_key`.
        trainable: bool. Whether the hub weights train. Defaults to `False`.
        **kwargs: Base layer arguments such as `name`.

    Example:

    ```python
    inputs = keras.Input(shape=(), dtype="string")
    features = HubLayer("/models/sentence_encoder")(inputs)
    outputs = keras.layers.Dense(5, activation="softmax")(features)
    model = keras.Model(inputs, outputs)
    ```
    """

    def __init__(
        self,
        handle: str,
        signature: str | None = None,
        output_key: str | None = None,
        trainable: bool = False,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("dtype", "float32")
        # Created trainable so the hub's trainable variables are tracked as such; the
        # `trainable` argument is applied at the end, which is what a schedule toggles.
        super().__init__(trainable=True, **kwargs)
        self.handle = os.fspath(handle)
        self.signature = signature
        self.output_key = output_key

        # === SavedModel ===
        self._hub_object, self.saved_model_path = _load_saved_model(self.handle)
        self._function = self._select_function()
        self._input_name = self._signature_input_name()
        self._takes_training = (
            signature is None and "training" in inspect.signature(self._function).parameters
        )
        self._check_output_key()

        # === Weights ===
        hub_trainable, hub_frozen = _variables_read_by(self._function)
        if self.uses_signature and trainable:
            raise TfxferError(
                f"Expected `trainable=False` for a model called through the signature "
                f"{self.signature_name!r}: TF-Hub signatures (TF1 Hub format) cannot be "
                f"fine-tuned. Received: trainable=True for handle={handle!r}. Use the model "
                f"as a frozen feature extractor, or a TF2 version of it that has __call__."
            )
        if self.uses_signature:
            hub_trainable, hub_frozen = [], hub_trainable + hub_frozen
        self.hub_weights = [self._alias(variable, trainable=True) for variable in hub_trainable] + [
            self._alias(variable, trainable=False) for variable in hub_frozen
        ]
        self.trainable = trainable
        self.built = True

    @property
    def uses_signature(self) -> bool:
        """Whether the model is called through a signature rather than its `__call__`."""
        return self.signature_name is not None

    def _select_function(self) -> Any:
        loaded = self._hub_object
        if self.signature is None and callable(loaded):
            self.signature_name = None
            return loaded.__call__
        name = self.signature or "serving_default"
        signatures = dict(getattr(loaded, "signatures", {}))
        if name not in signatures:
            raise WeightsError(
                f"Expected `signature` to be one of {sorted(signatures)} for the SavedModel "
                f"at {self.saved_model_path!r}"
                + ("" if callable(loaded) else ", which has no __call__")
                + f". Received: signature={self.signature!r}."
            )
        self.signature_name = name
        return signatures[name]

    def _signature_input_name(self) -> str | None:
        if not self.uses_signature:
            return None
        _, kwargs = self._function.structured_input_signature
        names = sorted(kwargs)
        if len(names) != 1:
            raise TfxferError(
                f"Expected the signature {self.signature_name!r} of {self.handle!r} to take "
                f"one input tensor. Received a signature with inputs {names}; "
                f"HubLayer feeds one tensor."
            )
        return names[0]

    def _check_output_key(self) -> None:
        concrete = _concrete_functions(self._function)
        if not concrete:
            raise WeightsError(
                f"The SavedModel at {self.saved_model_path!r} has a __call__ that was never "
                f"traced, so it cannot be called. Pass a `signature` to use instead."
            )
        outputs = concrete[0].structured_outputs
        if not isinstance(outputs, dict):
            if self.output_key is not None:
                raise TfxferError(
                    f"Expected `output_key=None`: {self.handle!r} returns a single tensor, "
                    f"not a dict. Received: output_key={self.output_key!r}."
                )
            return
        if self.output_key is None:
            if len(outputs) == 1 or "default" in outputs:
                return
            raise TfxferError(
                f"Expected `output_key` to name one output of {self.handle!r}, which "
                f"returns a dict with keys {sorted(outputs)}. Received: output_key=None."
            )
        if self.output_key not in outputs:
            raise TfxferError(
                f"Expected `output_key` to be one of {sorted(outputs)} for {self.handle!r}. "
                f"Received: output_key={self.output_key!r}."
            )

    def _alias(self, variable: tf.Variable, trainable: bool) -> keras.Variable:
        # A keras.Variable built from a tf.Variable wraps that very variable (this is how
        # keras.layers.TFSMLayer adopts SavedModel weights): the hub's functions and the
        # optimizer read and write the same memory.
        alias = keras.Variable(
            initializer=variable,
            shape=variable.shape,
            dtype=variable.dtype,
            trainable=trainable,
            name=variable.name.split(":")[0].replace("/", "_"),
        )
        if alias.value is not variable:
            # A copy would train weights the hub's functions never read.
            raise RuntimeError(
                f"This Keras version ({keras.__version__}) copies a tf.Variable passed to "
                f"keras.Variable instead of wrapping it; HubLayer needs the wrapping."
            )
        return alias

    @property
    def input_spec_from_model(self) -> tf.TensorSpec | None:
        """The shape and dtype the SavedModel declares for its input, if it declares one."""
        return _input_spec(self._function)

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        if self.uses_signature:
            arguments = inputs if isinstance(inputs, dict) else {self._input_name: inputs}
            outputs = self._function(**arguments)
        elif self._takes_training:
            outputs = self._function(inputs, training=bool(training) and self.trainable)
        else:
            outputs = self._function(inputs)
        if isinstance(outputs, dict):
            key = self.output_key
            if key is None:
                key = "default" if "default" in outputs else next(iter(outputs))
            outputs = outputs[key]
        return outputs

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {"handle": self.handle, "signature": self.signature, "output_key": self.output_key}
        )
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> HubLayer:
        # Keras has no public "are we in safe mode" query; this private one is what its own
        # TFSMLayer checks. It is None outside `load_model` (e.g. in `clone_model`).
        from keras.src.saving.serialization_lib import in_safe_mode

        if in_safe_mode():
            raise TfxferError(
                f"This model holds a HubLayer, which reloads the SavedModel "
                f"{config.get('handle')!r} and runs its graph. Keras refuses that in safe "
                f"mode. If you trust the file and the model, load it with "
                f"`keras.saving.load_model(path, safe_mode=False)`."
            )
        return cls(**config)
