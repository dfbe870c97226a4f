"""The names the operator shares with the API server, the chart and the tests: one home for each.

The CRDs under ``crds/`` declare the same group, version and plurals; ``tests`` check they agree.
"""

from __future__ import annotations

GROUP = "promptcache.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

MODELS = "deployedmodels"
POLICIES = "cachepolicies"
REPLAYS = "planreplays"

PREFIX = GROUP
"""Our annotations, labels and finalizer live under it; so do kopf's progress and diff-base annotations."""
FINALIZER = f"{PREFIX}/finalizer"
CHECKSUM_ANNOTATION = f"{PREFIX}/config-checksum"
GENERATION_ANNOTATION = f"{PREFIX}/generation"
"""On a replay Job and report: the PlanReplay generation it was started for."""
SHARDS_ANNOTATION = f"{PREFIX}/shards"
"""On a sharded replay Job: how many shards its pods sum (docs/design.md#sharded-planreplay)."""
PLAN_ENV = "PROMPTCACHE_REPLAY_PLAN"
"""A sharded replay pod's resolved plan (JSON): every shard and the operator's sum replay the same thing."""
WINDOW_ANNOTATION = f"{PREFIX}/window"
"""On a replay report: the window replayed, as an RFC 3339 interval ``start/end``."""
KEY_REQUEST_LABEL = f"{PREFIX}/api-key-request"
"""On a Secret (value ``"true"``): it asks the operator for an API key (docs/design.md#api-keys-from-secrets)."""
PRINCIPAL_ANNOTATION = f"{PREFIX}/principal"
"""On a key-request Secret: the principal's name within the namespace (default: the Secret's name)."""
ISSUED_TO_ANNOTATION = f"{PREFIX}/issued-to"
"""On a key-request Secret, once issued: the principal its key authenticates, ``NAMESPACE/NAME``."""
KEY_ID_ANNOTATION = f"{PREFIX}/key-id"
"""On a key-request Secret, once issued: the key's id, as ``promptcache keys list`` shows it."""
KEY_FINALIZER = f"{PREFIX}/revoke-api-key"
"""Our own finalizer on a key-request Secret: it goes once the key is revoked."""
KEY_FIELD = "api-key"
"""The key in a key-request Secret's data."""
COPIED_FROM_ANNOTATION = f"{PREFIX}/copied-from"
"""On a Secret the operator copied into a model's namespace: ``namespace/name`` of its source."""
REVISION_ANNOTATION = f"policy.{PREFIX}/revision"
"""Set on bound DeployedModels when their policy changes, so kopf re-runs their reconcile. Outside the
``promptcache.io/`` prefix on purpose: kopf keeps its own state there and leaves it out of the diffs."""

MODEL_LABEL = f"{PREFIX}/deployedmodel"
NAME_LABEL = "app.kubernetes.io/name"
INSTANCE_LABEL = "app.kubernetes.io/instance"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "promptcache-operator"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
"""Set on every EndpointSlice, to the name of the Service it belongs to."""
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
"""Set by the API server on every namespace, to its name: a NetworkPolicy selects a namespace by name with it."""
PROXY_APP = "promptcache-proxy"
REPLAY_APP = "promptcache-replay"

TOKENIZER_VOLUME = "tokenizer"
"""The proxy pod's volume holding a tokenizer file (a ConfigMap or ``spec.tokenizer.volume``): a sidecar server can
mount the same volume by this name."""
VOLUME_SOURCES = (
    "awsElasticBlockStore", "azureDisk", "azureFile", "cephfs", "cinder", "configMap", "csi", "ephemeral", "fc",
    "flexVolume", "gcePersistentDisk", "glusterfs", "hostPath", "image", "iscsi", "nfs", "persistentVolumeClaim",
    "portworxVolume", "projected", "rbd", "secret", "vsphereVolume",
)
"""The core/v1 volume sources ``spec.tokenizer.volume`` may be (the CRD declares the same; the deprecated in-tree
ones Kubernetes no longer serves are left out)."""
