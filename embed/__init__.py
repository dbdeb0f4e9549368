"""Image side of lesionfuse.

Image sources (`sources`); the frozen ImageNet ResNet-50 (`backbone`), the state dict it takes
(`resnet50`) and its weights (`weights`: cache and verify; `weights_npm`: fetch; `weights_tfjs`:
convert); what makes two embeddings comparable (`identity`); an embedding run's settings and
resources, and the identity they give (`config`), its reader (`reader`) and model loop
(`model_loop`); the feature store (`store_format` spells its files, manifests and names and finds
a data set's stores; `store` reads a store, `store_writer` writes it); and
`pipeline.build_store`, which runs them to fill a store.
"""

# The package's names live in its modules (`from embed.store import FeatureStore`); importing
# the package alone loads none of them.
__all__: list[str] = []
