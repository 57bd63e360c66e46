"""GGUF files: the type table (types), reading headers and split models (reader), writing
headers (writer) and DeepSeek2 tensor tables from shapes alone (deepseek2)."""
