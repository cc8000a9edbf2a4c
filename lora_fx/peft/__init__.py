"""PEFT interoperability: LoraConfig <-> rules (``config``), PEFT's adapter file format (``checkpoint``), what
PEFT's files hold besides LoRA tensors (``extras``), and the PeftModel interface (``compat``)."""
