"""Files: model directories (safetensors + metadata), exports, atomic writes."""
