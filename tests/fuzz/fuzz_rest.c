/* fuzz_rest.c -- the REST API's inference requests, from the bytes of a request body:
 * restjson_infer for an FP32 and an FP16 model, once with the whole body as JSON and once with
 * an Inference-Header-Content-Length taken from the first two bytes (the rest of the body then
 * holds binary tensor data). A request that passes must describe exactly rows * in elements
 * that can be read, in the body or in the converted JSON data (or be in a shared-memory region,
 * whose name is a string), and its answer must be JSON that parses again, with the id escaped. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"
#include "models.h"
#include "restjson.h"
#include "tensor.h"

static void check(const struct model *m, const char *body, size_t len, const char *hl)
{
    static const float y[4 * 2] = {1, -2, 3.5f, 0, 1e-30f, 7, 8, 9};
    struct restjson_infer r;
    struct tp_err err = {0};

    if (restjson_infer(m, "lin", "", body, len, hl, NULL, &r, &err) == 0) {
        size_t bytes = (size_t)r.in.rows * (size_t)m->in * tp_dtype_size(m->io_dtype);
        const unsigned char *x = r.in.x;
        char *text = NULL;
        size_t n = 0;
        FILE *f;
        cJSON *j;

        if (r.in.rows < 1 || r.in.rows > m->max_batch || !r.id)
            abort();
        if (x && x != (const unsigned char *)r.xs &&
            (x < (const unsigned char *)body || x + bytes > (const unsigned char *)body + len))
            abort();
        if (x)
            for (size_t i = 0; i < bytes; i++)
                fuzz_sink += x[i];
        else if (!r.in.in_region)
            abort();
        f = open_memstream(&text, &n);
        if (!f)
            abort();
        if (restjson_answer(f, m, r.id, &r.in, m->io_dtype == TP_F32 ? y : NULL,
                            m->io_dtype == TP_F32 ? (size_t)-1 : 16) < 0)
            abort();
        fclose(f);
        j = restjson_parse(text, n, "answer", &err);
        if (!j || strcmp(cJSON_GetObjectItem(j, "id")->valuestring, r.id) != 0)
            abort();
        cJSON_Delete(j);
        free(text);
    } else if ((err.code != TP_EINVAL && err.code != TP_ENOMEM) ||
               !memchr(err.msg, '\0', sizeof(err.msg))) {
        abort();
    }
    restjson_infer_free(&r);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char hl[16];

    for (int k = 0; k < 2; k++) {
        check(&models[k], (const char *)data, size, NULL);
        if (size >= 2) {
            snprintf(hl, sizeof(hl), "%u", (unsigned)(data[0] | data[1] << 8));
            check(&models[k], (const char *)data + 2, size - 2, hl);
        }
    }
    return 0;
}
