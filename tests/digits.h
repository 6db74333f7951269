/* The bundled UCI digits (examples/data) for the tests that train on them: 1797 8x8 images,
   pixels scaled to [0, 1], labels 0..9. Include after test.h; DATA_DIR names the folder. */
#ifndef MOE_TEST_DIGITS_H
#define MOE_TEST_DIGITS_H

#ifndef DATA_DIR
#define DATA_DIR "examples/data"
#endif

static float *images;
static int32_t *labels;
static int64_t n_samples;

static int load_digits(void) {
    FILE *fi = fopen(DATA_DIR "/digits-images-idx3-ubyte", "rb"), *fl = fopen(DATA_DIR "/digits-labels-idx1-ubyte", "rb");
    unsigned char hi[16], hl[8], *px;
    int64_t i;
    int ok = 0;
    if (fi && fl && fread(hi, 1, 16, fi) == 16 && fread(hl, 1, 8, fl) == 8 && hi[3] == 3 && hl[3] == 1) {
        n_samples = (int64_t)hi[4] << 24 | (int64_t)hi[5] << 16 | (int64_t)hi[6] << 8 | hi[7];
        if (n_samples == 1797) {
            px = (unsigned char *)malloc((size_t)(n_samples * 64));
            images = (float *)malloc(sizeof(float) * (size_t)(n_samples * 64));
            labels = (int32_t *)malloc(sizeof(int32_t) * (size_t)n_samples);
            if (fread(px, 1, (size_t)(n_samples * 64), fi) == (size_t)(n_samples * 64) && fread(px, 0, 0, fl) == 0) {
                unsigned char *lb = (unsigned char *)malloc((size_t)n_samples);
                if (fread(lb, 1, (size_t)n_samples, fl) == (size_t)n_samples) {
                    for (i = 0; i < n_samples * 64; i++) images[i] = px[i] / 16.0f;
                    for (i = 0; i < n_samples; i++) labels[i] = lb[i];
                    ok = 1;
                }
                free(lb);
            }
            free(px);
        }
    }
    if (fi) fclose(fi);
    if (fl) fclose(fl);
    return ok;
}

#endif
