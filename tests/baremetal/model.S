/* The model file's bytes, linked into the image (MODEL_FILE: its path, set by the build). */
    .section .rodata.model, "a"
    .balign 64
    .global model_start
    .global model_end
model_start:
    .incbin MODEL_FILE
model_end:
