"""The engine (ik_llama.cpp's tools): how it is built and cached (build, sources), the command
lines it is given (argv), how it is run (run) and how its output is read (logparse)."""
