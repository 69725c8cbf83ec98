"""The LoRAyard training job: config -> data -> train -> evaluate -> publish.

``python -m lorayard.train --config CONFIG.yaml`` trains a LoRA adapter on the shared base model and
publishes it as the next version on the adapters volume (see ``lorayard.volume``).
"""
