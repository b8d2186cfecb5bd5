/* restjson.c -- the REST API's JSON (see restjson.h). A request is turned into the
 * ModelInferRequest that gRPC would have carried -- its binary tensor data left in the body, its
 * JSON data converted to FP32 -- so that infer_validate decides for both front ends. */
#include "restjson.h"

#include <grpc/status.h>
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "grpc_service.pb-c.h"

#define REST_MAX_PARAMS 16 /* parameters of one tensor */
#define REST_MAX_OUTPUTS 4 /* requested outputs parsed (the model has one) */

/* ---- requests ---- */

static int utf8_ok(const unsigned char *s, size_t n)
{
    struct infer_utf8 u = {0};

    for (size_t i = 0; i < n; i++)
        if (infer_utf8_step(&u, s[i]) < 0)
            return 0;
    return u.need == 0;
}

void restjson_clean_utf8(char *s)
{
    struct infer_utf8 u = {0};
    char *start = s;

    for (char *p = s; *p; p++) {
        if (!u.need)
            start = p;
        if (infer_utf8_step(&u, (uint8_t)*p) == 0)
            continue;
        u = (struct infer_utf8){0};
        if (p > start) { /* a sequence cut short: its bytes go, p starts again */
            memset(start, '?', (size_t)(p - start));
            start = p;
            if (infer_utf8_step(&u, (uint8_t)*p) == 0)
                continue;
            u = (struct infer_utf8){0};
        }
        *p = '?';
    }
    if (u.need) /* cut short at the end */
        memset(start, '?', strlen(start));
}

cJSON *restjson_parse(const char *text, size_t n, const char *what, struct tp_err *err)
{
    const char *end = NULL;
    cJSON *j;

    if (!utf8_ok((const unsigned char *)text, n)) {
        tp_err_set(err, TP_EINVAL, "the %s is not UTF-8 JSON text", what);
        return NULL;
    }
    if (memmem(text, n, "\\u0000", 6)) {
        tp_err_set(err, TP_EINVAL, "the %s has a \\u0000 escape; strings must not hold NUL", what);
        return NULL;
    }
    j = cJSON_ParseWithLengthOpts(text, n, &end, 0);
    while (j && end < text + n && strchr(" \t\r\n", *end))
        end++;
    if (j && end != text + n) {
        cJSON_Delete(j);
        j = NULL;
    }
    if (!j)
        tp_err_set(err, TP_EINVAL, "the %s is not valid JSON: error at byte %td of %zu", what,
                   end ? end - text : 0, n);
    return j;
}

int restjson_int(const cJSON *v, double lo, double hi, int64_t *out)
{
    double d;

    if (!cJSON_IsNumber(v))
        return -1;
    d = v->valuedouble;
    if (!(d >= lo && d <= hi) || d != floor(d))
        return -1;
    *out = (int64_t)d;
    return 0;
}

/* A tensor's parameters object as InferParameters in keys/vals (storage pv), the bare JSON
 * values turned into the oneof gRPC would carry; binary_data_size and binary_data are taken out
 * (NULL when absent). */
static int tensor_params(const char *tensor, const cJSON *params, char **keys,
                         Inference__InferParameter *pv, size_t *n, const cJSON **binary_size,
                         const cJSON **binary, struct tp_err *err)
{
    const cJSON *p;

    *n = 0;
    *binary_size = *binary = NULL;
    if (!params)
        return 0;
    if (!cJSON_IsObject(params))
        return tp_err_set(err, TP_EINVAL, "'%s' parameters must be an object", tensor);
    cJSON_ArrayForEach(p, params)
    {
        Inference__InferParameter *v = &pv[*n];
        int64_t i;

        if (strcmp(p->string, "binary_data_size") == 0) {
            *binary_size = p;
            continue;
        }
        if (strcmp(p->string, "binary_data") == 0) {
            *binary = p;
            continue;
        }
        if (strcmp(p->string, "classification") == 0)
            return tp_err_set(err, TP_EINVAL,
                              "'%s' parameter classification is not supported: tpd returns the "
                              "whole output",
                              tensor);
        if (*n == REST_MAX_PARAMS)
            return tp_err_set(err, TP_EINVAL, "'%s' has more than %d parameters", tensor,
                              REST_MAX_PARAMS);
        *v = (Inference__InferParameter)INFERENCE__INFER_PARAMETER__INIT;
        if (cJSON_IsBool(p)) {
            v->parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_BOOL_PARAM;
            v->bool_param = cJSON_IsTrue(p);
        } else if (cJSON_IsString(p)) {
            v->parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_STRING_PARAM;
            v->string_param = p->valuestring;
        } else if (restjson_int(p, -9.2e18, 9.2e18, &i) == 0) {
            v->parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_INT64_PARAM;
            v->int64_param = i;
        } else if (cJSON_IsNumber(p)) {
            v->parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_DOUBLE_PARAM;
            v->double_param = p->valuedouble;
        } else {
            return tp_err_set(err, TP_EINVAL,
                              "'%s' parameter %.64s must be a boolean, number or string", tensor,
                              p->string);
        }
        keys[(*n)++] = p->string;
    }
    return 0;
}

/* Counts the numbers of a (possibly nested) data array, depth at most INFER_MAX_DIMS; -1 for
 * anything else. Stores them as FP32 into x when x is not NULL. */
static int64_t data_count(const cJSON *a, int depth, float *x, int64_t at, struct tp_err *err)
{
    const cJSON *v;
    int64_t n = 0;

    if (depth > INFER_MAX_DIMS)
        return tp_err_set(err, TP_EINVAL, "input data is nested deeper than %d arrays",
                          INFER_MAX_DIMS);
    cJSON_ArrayForEach(v, a)
    {
        if (cJSON_IsArray(v)) {
            int64_t k = data_count(v, depth + 1, x, at + n, err);

            if (k < 0)
                return -1;
            n += k;
        } else if (cJSON_IsNumber(v)) {
            if (x) {
                float f = (float)v->valuedouble;

                if (isinf(f))
                    return tp_err_set(err, TP_EINVAL,
                                      "input data[%" PRId64 "] = %g is out of FP32's range", at + n,
                                      v->valuedouble);
                x[at + n] = f;
            }
            n++;
        } else {
            return tp_err_set(err, TP_EINVAL, "input data[%" PRId64 "] is not a number", at + n);
        }
    }
    return n;
}

/* ---- the data array, read without a tree ----
 * cJSON makes a node, with a malloc and a strtod through the locale, of every number: for the
 * 262144 numbers of a 64 x 4096 request most of the time of a JSON inference. So the text of
 * inputs[0].data is found by a scan that builds nothing, its numbers are read by strtof (which
 * rounds the decimal to the nearest float directly, where cJSON goes through a double), and
 * cJSON parses the rest of the header with "[]" in the array's place. Whatever the scan does not
 * understand (an escaped key before the array, a value that is not a JSON number) leaves the
 * request to cJSON alone, which then decides. */

#define SPAN_DEPTH 64 /* nesting the scan skips; deeper, cJSON decides */

static void span_ws(const char *s, size_t n, size_t *i)
{
    while (*i < n && (s[*i] == ' ' || s[*i] == '\t' || s[*i] == '\n' || s[*i] == '\r'))
        (*i)++;
}

/* Past the string at *i; -1 when there is none; *escaped set when it holds a backslash. */
static int span_string(const char *s, size_t n, size_t *i, int *escaped)
{
    if (*i >= n || s[*i] != '"')
        return -1;
    for ((*i)++; *i < n; (*i)++) {
        if (s[*i] == '\\') {
            *escaped = 1;
            (*i)++;
        } else if (s[*i] == '"') {
            (*i)++;
            return 0;
        }
    }
    return -1;
}

static int span_value(const char *s, size_t n, size_t *i, int depth)
{
    int escaped = 0;
    char close;

    span_ws(s, n, i);
    if (*i >= n || depth > SPAN_DEPTH)
        return -1;
    if (s[*i] == '"')
        return span_string(s, n, i, &escaped);
    if (s[*i] != '{' && s[*i] != '[') {
        while (*i < n && s[*i] != ',' && s[*i] != ']' && s[*i] != '}' && s[*i] != ' ' &&
               s[*i] != '\t' && s[*i] != '\r' && s[*i] != '\n')
            (*i)++;
        return 0;
    }
    close = s[*i] == '{' ? '}' : ']';
    (*i)++;
    span_ws(s, n, i);
    if (*i < n && s[*i] == close) {
        (*i)++;
        return 0;
    }
    for (;;) {
        if (close == '}') {
            span_ws(s, n, i);
            if (span_string(s, n, i, &escaped) < 0)
                return -1;
            span_ws(s, n, i);
            if (*i >= n || s[*i] != ':')
                return -1;
            (*i)++;
        }
        if (span_value(s, n, i, depth + 1) < 0)
            return -1;
        span_ws(s, n, i);
        if (*i < n && s[*i] == ',') {
            (*i)++;
            continue;
        }
        if (*i < n && s[*i] == close) {
            (*i)++;
            return 0;
        }
        return -1;
    }
}

/* In the object whose '{' is before *i, moves *i to the value of its first member named key, as
 * cJSON_GetObjectItemCaseSensitive finds it; -1 when there is none, or an escaped key comes
 * first (which might spell key). */
static int span_key(const char *s, size_t n, size_t *i, const char *key)
{
    size_t klen = strlen(key);

    for (;;) {
        size_t k0;
        int escaped = 0, hit;

        span_ws(s, n, i);
        k0 = *i + 1;
        if (span_string(s, n, i, &escaped) < 0 || escaped)
            return -1;
        hit = *i - 1 - k0 == klen && memcmp(s + k0, key, klen) == 0;
        span_ws(s, n, i);
        if (*i >= n || s[*i] != ':')
            return -1;
        (*i)++;
        span_ws(s, n, i);
        if (hit)
            return 0;
        if (span_value(s, n, i, 1) < 0)
            return -1;
        span_ws(s, n, i);
        if (*i >= n || s[*i] != ',')
            return -1;
        (*i)++;
    }
}

/* Where inputs[0].data's array starts in the header. */
static int span_find(const char *s, size_t n, size_t *at)
{
    size_t i = 0;

    span_ws(s, n, &i);
    if (i >= n || s[i++] != '{' || span_key(s, n, &i, "inputs") < 0 || i >= n || s[i++] != '[')
        return -1;
    span_ws(s, n, &i);
    if (i >= n || s[i++] != '{' || span_key(s, n, &i, "data") < 0 || i >= n || s[i] != '[')
        return -1;
    *at = i;
    return 0;
}

/* The numbers of the array at s[*i] (nested arrays flattened, INFER_MAX_DIMS deep at most),
 * counted in *count and, with x, read into x; -1 for anything else: a value that is not a JSON
 * number, or one beyond FP32's range. */
static int span_numbers(const char *s, size_t n, size_t *i, int depth, float *x, int64_t *count)
{
    if (depth > INFER_MAX_DIMS)
        return -1;
    (*i)++;
    span_ws(s, n, i);
    if (*i < n && s[*i] == ']') {
        (*i)++;
        return 0;
    }
    for (;;) {
        span_ws(s, n, i);
        if (*i < n && s[*i] == '[') {
            if (span_numbers(s, n, i, depth + 1, x, count) < 0)
                return -1;
        } else {
            size_t j = *i, k;
            char num[40], *end;

            /* JSON's grammar: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)? */
            if (j < n && s[j] == '-')
                j++;
            if (j < n && s[j] == '0')
                j++;
            else if (j < n && s[j] >= '1' && s[j] <= '9')
                while (j < n && s[j] >= '0' && s[j] <= '9')
                    j++;
            else
                return -1;
            if (j < n && s[j] == '.') {
                k = ++j;
                while (j < n && s[j] >= '0' && s[j] <= '9')
                    j++;
                if (j == k)
                    return -1;
            }
            if (j < n && (s[j] == 'e' || s[j] == 'E')) {
                if (++j < n && (s[j] == '+' || s[j] == '-'))
                    j++;
                k = j;
                while (j < n && s[j] >= '0' && s[j] <= '9')
                    j++;
                if (j == k)
                    return -1;
            }
            if (j - *i >= sizeof(num))
                return -1; /* longer than any float needs: cJSON decides */
            if (x) {
                memcpy(num, s + *i, j - *i);
                num[j - *i] = '\0';
                x[*count] = strtof(num, &end);
                if (isinf(x[*count]))
                    return -1;
            }
            (*count)++;
            *i = j;
        }
        span_ws(s, n, i);
        if (*i < n && s[*i] == ',') {
            (*i)++;
            continue;
        }
        if (*i < n && s[*i] == ']') {
            (*i)++;
            return 0;
        }
        return -1;
    }
}

/* The header of n bytes parsed with its data array read apart: into *xs (malloc'd, *count
 * numbers) and "[]" in its place; NULL with *xs NULL when the scan gives up (then the caller
 * parses as usual), or with err set when out of memory. */
static cJSON *parse_fast(const char *s, size_t n, float **xs, int64_t *count, struct tp_err *err)
{
    size_t at, end, i;
    char *text;
    cJSON *j;

    *xs = NULL;
    *count = 0;
    if (span_find(s, n, &at) < 0 || (i = at, span_numbers(s, n, &i, 1, NULL, count)) < 0)
        return NULL;
    end = i;
    *xs = malloc((size_t)(*count ? *count : 1) * sizeof(float));
    text = malloc(n - (end - at) + 2);
    if (!*xs || !text) {
        free(text);
        tp_err_set(err, TP_ENOMEM, "no memory for the request's %" PRId64 " numbers", *count);
        return NULL;
    }
    *count = 0;
    i = at;
    if (span_numbers(s, end, &i, 1, *xs, count) < 0) {
        free(text);
        free(*xs);
        *xs = NULL;
        return NULL;
    }
    memcpy(text, s, at);
    memcpy(text + at, "[]", 2);
    memcpy(text + at + 2, s + end, n - end);
    j = restjson_parse(text, n - (end - at) + 2, "inference request", err);
    free(text);
    if (!j) { /* say where in the request itself */
        free(*xs);
        *xs = NULL;
        j = restjson_parse(s, n, "inference request", err);
        cJSON_Delete(j); /* it parses after all: the scan erred, so refuse it as malformed */
        if (j)
            tp_err_set(err, TP_EINVAL, "the inference request could not be read");
        return NULL;
    }
    return j;
}

/* Copies a region's name (from the JSON, freed after the parse) into dst. */
static int region_name(const char *tensor, const char *src, char *dst, struct tp_err *err)
{
    if (strlen(src) >= SHMREG_NAME_MAX)
        return tp_err_set(err, TP_EINVAL,
                          "'%s' shared_memory_region has more than %d bytes: no region has such a "
                          "name",
                          tensor, SHMREG_NAME_MAX - 1);
    strcpy(dst, src);
    return 0;
}

int restjson_infer(const struct model *m, const char *model, const char *version, const char *body,
                   size_t len, const char *hl, const char *enc, struct restjson_infer *q,
                   struct tp_err *err)
{
    size_t jlen = len, at;
    cJSON *j = NULL;
    const cJSON *inputs, *outputs, *t, *v, *bsize, *bin;
    Inference__ModelInferRequest r = INFERENCE__MODEL_INFER_REQUEST__INIT;
    Inference__ModelInferRequest__InferInputTensor it =
        INFERENCE__MODEL_INFER_REQUEST__INFER_INPUT_TENSOR__INIT;
    Inference__ModelInferRequest__InferInputTensor *itp[1] = {&it};
    Inference__InferTensorContents contents = INFERENCE__INFER_TENSOR_CONTENTS__INIT;
    Inference__ModelInferRequest__InferRequestedOutputTensor ot[REST_MAX_OUTPUTS];
    Inference__ModelInferRequest__InferRequestedOutputTensor *otp[REST_MAX_OUTPUTS];
    Inference__InferParameter pv[REST_MAX_OUTPUTS + 1][REST_MAX_PARAMS];
    char *keys[REST_MAX_OUTPUTS + 1][REST_MAX_PARAMS];
    Inference__ModelInferRequest__InferInputTensor__ParametersEntry ie[REST_MAX_PARAMS];
    Inference__ModelInferRequest__InferInputTensor__ParametersEntry *iep[REST_MAX_PARAMS];
    Inference__ModelInferRequest__InferRequestedOutputTensor__ParametersEntry oe[REST_MAX_OUTPUTS]
                                                                                [REST_MAX_PARAMS];
    Inference__ModelInferRequest__InferRequestedOutputTensor__ParametersEntry
        *oep[REST_MAX_OUTPUTS][REST_MAX_PARAMS];
    ProtobufCBinaryData raw;
    int64_t shape[INFER_MAX_DIMS + 1], timeout_us = 0, binary_size = -1, fast_count = 0;
    int binary_output = 0, out_binary = -1, rc = -1;
    size_t np;
    const char *dt = tp_dtype_wire_name(m->io_dtype);

    *q = (struct restjson_infer){0};
    if (infer_check_model(m, model, version, err) < 0)
        return -1;
    if (enc && strcmp(enc, "identity") != 0)
        return tp_err_set(err, TP_EINVAL,
                          "Content-Encoding '%.32s' is not supported: send the body as it is, "
                          "gzip'd or deflate'd",
                          enc);
    if (hl) {
        char *end;
        unsigned long long h = strtoull(hl, &end, 10);

        if (!hl[0] || *end || hl[0] == '-' || h > len)
            return tp_err_set(err, TP_EINVAL,
                              RESTJSON_HEADER " '%.32s' is not a byte count within the body's %zu "
                                              "bytes",
                              hl, len);
        jlen = (size_t)h;
    }
    j = parse_fast(body ? body : "", jlen, &q->xs, &fast_count, err);
    if (!j && err->code != TP_OK)
        return -1;
    if (!j)
        j = restjson_parse(body ? body : "", jlen, "inference request", err);
    if (!j)
        return -1;
    if (!cJSON_IsObject(j)) {
        tp_err_set(err, TP_EINVAL, "the inference request must be a JSON object");
        goto out;
    }
    r.model_name = (char *)model;
    r.model_version = (char *)version;
    v = cJSON_GetObjectItemCaseSensitive(j, "id");
    if (v && !cJSON_IsString(v)) {
        tp_err_set(err, TP_EINVAL, "'id' must be a string");
        goto out;
    }
    q->id = strdup(v ? v->valuestring : "");
    if (!q->id) {
        tp_err_set(err, TP_ENOMEM, "no memory for the request");
        goto out;
    }
    r.id = q->id;
    v = cJSON_GetObjectItemCaseSensitive(j, "parameters");
    if (v && !cJSON_IsObject(v)) {
        tp_err_set(err, TP_EINVAL, "'parameters' must be an object");
        goto out;
    }
    if (v) {
        const cJSON *p = cJSON_GetObjectItemCaseSensitive(v, "binary_data_output");
        const cJSON *tmo = cJSON_GetObjectItemCaseSensitive(v, "timeout");

        if (p && !cJSON_IsBool(p)) {
            tp_err_set(err, TP_EINVAL, "parameter binary_data_output must be a boolean");
            goto out;
        }
        binary_output = p && cJSON_IsTrue(p);
        if (tmo && restjson_int(tmo, 0, 9.2e15, &timeout_us) < 0) {
            tp_err_set(err, TP_EINVAL, "parameter timeout must be an integer of microseconds");
            goto out;
        }
    }
    inputs = cJSON_GetObjectItemCaseSensitive(j, "inputs");
    if (!cJSON_IsArray(inputs)) {
        tp_err_set(err, TP_EINVAL, "'inputs' must be an array of tensors");
        goto out;
    }
    if (cJSON_GetArraySize(inputs) != 1) {
        tp_err_set(err, TP_EINVAL, "expected 1 input, got %d", cJSON_GetArraySize(inputs));
        goto out;
    }
    t = inputs->child;
    {
        const cJSON *name = cJSON_GetObjectItemCaseSensitive(t, "name");
        const cJSON *dtype = cJSON_GetObjectItemCaseSensitive(t, "datatype");
        const cJSON *sh = cJSON_GetObjectItemCaseSensitive(t, "shape");
        int k = 0;

        if (!cJSON_IsObject(t) || !cJSON_IsString(name) || !cJSON_IsString(dtype) ||
            !cJSON_IsArray(sh)) {
            tp_err_set(err, TP_EINVAL,
                       "inputs[0] must be an object with 'name' and 'datatype' strings and a "
                       "'shape' array");
            goto out;
        }
        if (cJSON_GetArraySize(sh) > INFER_MAX_DIMS + 1) {
            tp_err_set(err, TP_EINVAL, "input '%.64s' has %d dims, at most %d are accepted",
                       name->valuestring, cJSON_GetArraySize(sh), INFER_MAX_DIMS);
            goto out;
        }
        cJSON_ArrayForEach(v, sh)
        {
            if (restjson_int(v, -9.2e18, 9.2e18, &shape[k++]) < 0) {
                tp_err_set(err, TP_EINVAL, "input '%.64s' shape[%d] is not an integer",
                           name->valuestring, k - 1);
                goto out;
            }
        }
        it.name = name->valuestring;
        it.datatype = dtype->valuestring;
        it.n_shape = (size_t)k;
        it.shape = shape;
    }
    if (tensor_params("input", cJSON_GetObjectItemCaseSensitive(t, "parameters"), keys[0], pv[0],
                      &np, &bsize, &bin, err) < 0)
        goto out;
    for (size_t i = 0; i < np; i++) {
        ie[i] = (Inference__ModelInferRequest__InferInputTensor__ParametersEntry)
            INFERENCE__MODEL_INFER_REQUEST__INFER_INPUT_TENSOR__PARAMETERS_ENTRY__INIT;
        ie[i].key = keys[0][i];
        ie[i].value = &pv[0][i];
        iep[i] = &ie[i];
    }
    it.n_parameters = np;
    it.parameters = iep;
    v = cJSON_GetObjectItemCaseSensitive(t, "data");
    at = jlen;
    if (bsize && restjson_int(bsize, 0, 9.2e18, &binary_size) < 0) {
        tp_err_set(err, TP_EINVAL, "'input' parameter binary_data_size must be an integer >= 0");
        goto out;
    }
    if (bsize) {
        if (v) {
            tp_err_set(err, TP_EINVAL, "input 'input' has both binary_data_size and 'data'");
            goto out;
        }
        if ((uint64_t)binary_size > len - at) {
            tp_err_set(err, TP_EINVAL,
                       "input 'input' binary_data_size %" PRId64 " is more than the %zu bytes "
                       "after the JSON header",
                       binary_size, len - at);
            goto out;
        }
        raw.len = (size_t)binary_size;
        raw.data = (uint8_t *)(uintptr_t)body + at;
        at += (size_t)binary_size;
        r.n_raw_input_contents = 1;
        r.raw_input_contents = &raw;
    } else if (v) {
        struct tp_err derr = {0};
        int64_t count;

        if (!cJSON_IsArray(v)) {
            tp_err_set(err, TP_EINVAL, "input 'input' data must be an array of numbers");
            goto out;
        }
        if (m->io_dtype != TP_F32) {
            tp_err_set(err, TP_EINVAL,
                       "input 'input' is %s: send it as binary data (parameter "
                       "binary_data_size); JSON data carries FP32 only",
                       dt);
            goto out;
        }
        if (q->xs) { /* read by the scan */
            count = fast_count;
        } else {
            count = data_count(v, 1, NULL, 0, &derr);
            if (count < 0) {
                *err = derr;
                goto out;
            }
            q->xs = malloc((size_t)(count ? count : 1) * sizeof(float));
            if (!q->xs) {
                tp_err_set(err, TP_ENOMEM, "no memory for %" PRId64 " numbers of input", count);
                goto out;
            }
            if (data_count(v, 1, q->xs, 0, err) < 0)
                goto out;
        }
        contents.n_fp32_contents = (size_t)count;
        contents.fp32_contents = q->xs;
        it.contents = &contents;
    }
    if (at != len) {
        tp_err_set(err, TP_EINVAL,
                   "the body has %zu bytes after the JSON header and the inputs' binary data",
                   len - at);
        goto out;
    }
    r.n_inputs = 1;
    r.inputs = itp;
    outputs = cJSON_GetObjectItemCaseSensitive(j, "outputs");
    if (outputs && !cJSON_IsArray(outputs)) {
        tp_err_set(err, TP_EINVAL, "'outputs' must be an array");
        goto out;
    }
    if (cJSON_GetArraySize(outputs) > REST_MAX_OUTPUTS) {
        tp_err_set(err, TP_EINVAL, "%d requested outputs, the model has 1",
                   cJSON_GetArraySize(outputs));
        goto out;
    }
    cJSON_ArrayForEach(t, outputs)
    {
        size_t o = r.n_outputs;
        const cJSON *name = cJSON_GetObjectItemCaseSensitive(t, "name");

        if (!cJSON_IsObject(t) || !cJSON_IsString(name)) {
            tp_err_set(err, TP_EINVAL, "outputs[%zu] must be an object with a 'name' string", o);
            goto out;
        }
        ot[o] = (Inference__ModelInferRequest__InferRequestedOutputTensor)
            INFERENCE__MODEL_INFER_REQUEST__INFER_REQUESTED_OUTPUT_TENSOR__INIT;
        ot[o].name = name->valuestring;
        if (tensor_params("output", cJSON_GetObjectItemCaseSensitive(t, "parameters"), keys[o + 1],
                          pv[o + 1], &np, &bsize, &bin, err) < 0)
            goto out;
        if (bin && !cJSON_IsBool(bin)) {
            tp_err_set(err, TP_EINVAL, "'output' parameter binary_data must be a boolean");
            goto out;
        }
        if (bin)
            out_binary = cJSON_IsTrue(bin);
        for (size_t i = 0; i < np; i++) {
            oe[o][i] = (Inference__ModelInferRequest__InferRequestedOutputTensor__ParametersEntry)
                INFERENCE__MODEL_INFER_REQUEST__INFER_REQUESTED_OUTPUT_TENSOR__PARAMETERS_ENTRY__INIT;
            oe[o][i].key = keys[o + 1][i];
            oe[o][i].value = &pv[o + 1][i];
            oep[o][i] = &oe[o][i];
        }
        ot[o].n_parameters = np;
        ot[o].parameters = oep[o];
        otp[o] = &ot[o];
        r.n_outputs++;
    }
    r.outputs = otp;
    if (infer_validate(m, &r, NULL, &q->in, err) < 0)
        goto out;
    if (q->in.out_region && out_binary == 1) {
        tp_err_set(err, TP_EINVAL,
                   "output 'output' is in shared-memory region '%.64s' and also asks for binary "
                   "data",
                   q->in.out_region);
        goto out;
    }
    q->binary_out = out_binary >= 0 ? out_binary : binary_output;
    if (!q->in.out_region && !q->binary_out && m->io_dtype != TP_F32) {
        tp_err_set(err, TP_EINVAL,
                   "output 'output' is %s: ask for it as binary data (parameter binary_data); "
                   "JSON data carries FP32 only",
                   dt);
        goto out;
    }
    if (q->in.in_region && region_name("input", q->in.in_region, q->in_region, err) < 0)
        goto out;
    if (q->in.out_region && region_name("output", q->in.out_region, q->out_region, err) < 0)
        goto out;
    q->in.in_region = q->in.in_region ? q->in_region : NULL; /* they pointed into the JSON */
    q->in.out_region = q->in.out_region ? q->out_region : NULL;
    q->timeout_us = timeout_us > 0 ? timeout_us : 0;
    rc = 0;
out:
    cJSON_Delete(j);
    return rc;
}

void restjson_infer_free(struct restjson_infer *r)
{
    free(r->id);
    free(r->xs);
    r->id = NULL;
    r->xs = NULL;
}

/* ---- answers ---- */

/* 10^k as a double, for |k| <= 22 exactly; beyond, within a few ulps. */
static double pow10i(int k)
{
    static const double p[23] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,
                                 1e8,  1e9,  1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
                                 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};
    double r = 1;

    if (k < 0)
        return 1 / pow10i(-k);
    for (; k > 22; k -= 22)
        r *= p[22];
    return r * p[k];
}

/* v's 9 significant digits, rounded: m in [1e8, 1e9) and its decimal exponent. The scaling's
 * error (a few ulps of a double) can move m by one only at a near-tie, which keeps it within
 * half a unit of its 9th digit, far inside half a float's spacing. */
static uint64_t scaled(double v, int e)
{
    return (uint64_t)llround(e <= 8 ? v * pow10i(8 - e) : v / pow10i(e - 8));
}

static uint64_t digits9(double v, int *e10)
{
    int e2, e;
    uint64_t m;

    frexp(v, &e2); /* v in [2^(e2-1), 2^e2): log10(v) at least (e2 - 1) log10(2) */
    e = (int)floor((e2 - 1) * 0.30102999566398120);
    m = scaled(v, e);
    while (m >= 1000000000) /* the estimate was low, or v rounds up to the next power */
        m = scaled(v, ++e);
    while (m < 100000000)
        m = scaled(v, --e);
    *e10 = e;
    return m;
}

size_t restjson_f32(char *out, float f)
{
    char d[9], *p = out;
    double v = f;
    uint64_t m;
    int e, nd = 9;

    if (signbit(v)) {
        *p++ = '-';
        v = -v;
    }
    if (v == 0) {
        memcpy(p, "0.0", 3);
        return (size_t)(p + 3 - out);
    }
    m = digits9(v, &e);
    for (int i = 8; i >= 0; i--, m /= 10)
        d[i] = (char)('0' + m % 10);
    while (nd > 1 && d[nd - 1] == '0')
        nd--;
    if (e >= -5 && e < 9) { /* plain: 123.45, 0.00012 */
        if (e < 0) {
            memcpy(p, "0.", 2);
            p += 2;
            for (int i = -1; i > e; i--)
                *p++ = '0';
            memcpy(p, d, (size_t)nd);
            p += nd;
        } else {
            for (int i = 0; i <= e || i < nd; i++) {
                if (i == e + 1)
                    *p++ = '.';
                *p++ = i < nd ? d[i] : '0';
            }
        }
    } else { /* 1.2345e-07 */
        *p++ = d[0];
        if (nd > 1) {
            *p++ = '.';
            memcpy(p, d + 1, (size_t)nd - 1);
            p += nd - 1;
        }
        p += sprintf(p, "e%d", e);
    }
    return (size_t)(p - out);
}

int restjson_answer(FILE *f, const struct model *m, const char *id, const struct infer_input *in,
                    const float *data, size_t binary_size)
{
    size_t n = (size_t)in->rows * (size_t)m->out;

    fputs("{\"model_name\":", f);
    {
        cJSON *s = cJSON_CreateString(m->name);
        char *p = s ? cJSON_PrintUnformatted(s) : NULL;

        fputs(p ? p : "\"\"", f);
        free(p);
        cJSON_Delete(s);
        s = cJSON_CreateString(id ? id : "");
        p = s ? cJSON_PrintUnformatted(s) : NULL;
        fprintf(f, ",\"model_version\":\"%s\",\"id\":%s", MODEL_VERSION, p ? p : "\"\"");
        free(p);
        cJSON_Delete(s);
    }
    fprintf(f, ",\"outputs\":[{\"name\":\"%s\",\"datatype\":\"%s\",\"shape\":[", MODEL_OUTPUT,
            tp_dtype_wire_name(m->io_dtype));
    for (uint32_t i = 0; i < in->nlead; i++)
        fprintf(f, "%" PRId64 ",", in->lead[i]);
    fprintf(f, "%" PRId64 "]", m->out);
    if (binary_size != (size_t)-1)
        fprintf(f, ",\"parameters\":{\"binary_data_size\":%zu}", binary_size);
    if (data) {
        char buf[4096];
        size_t k = 0;

        fputs(",\"data\":[", f);
        for (size_t i = 0; i < n; i++) {
            if (!isfinite(data[i]))
                return -1;
            if (k > sizeof(buf) - RESTJSON_F32_MAX - 1) {
                fwrite(buf, 1, k, f);
                k = 0;
            }
            if (i)
                buf[k++] = ',';
            k += restjson_f32(buf + k, data[i]);
        }
        fwrite(buf, 1, k, f);
        fputc(']', f);
    }
    fputs("}]}", f);
    return 0;
}

unsigned restjson_status(int grpc_code)
{
    switch (grpc_code) {
    case GRPC_STATUS_OK: return 200;
    case GRPC_STATUS_DEADLINE_EXCEEDED: return 504;
    case GRPC_STATUS_NOT_FOUND: return 404;
    case GRPC_STATUS_RESOURCE_EXHAUSTED: return 429;
    case GRPC_STATUS_UNIMPLEMENTED: return 501;
    case GRPC_STATUS_INTERNAL: return 500;
    case GRPC_STATUS_UNAVAILABLE: return 503;
    default: return 400; /* INVALID_ARGUMENT, CANCELLED, UNKNOWN, ALREADY_EXISTS, ... */
    }
}

/* ---- protobuf messages as JSON ----
 * Metadata, configuration and statistics are built once, as the messages gRPC sends (api.h),
 * and written here as Triton writes them. */

static cJSON *pb_value(const ProtobufCFieldDescriptor *f, const void *p)
{
    switch (f->type) {
    case PROTOBUF_C_TYPE_INT32:
    case PROTOBUF_C_TYPE_SINT32:
    case PROTOBUF_C_TYPE_SFIXED32: return cJSON_CreateNumber(*(const int32_t *)p);
    case PROTOBUF_C_TYPE_UINT32:
    case PROTOBUF_C_TYPE_FIXED32: return cJSON_CreateNumber(*(const uint32_t *)p);
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64: return cJSON_CreateNumber((double)*(const int64_t *)p);
    case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_FIXED64: return cJSON_CreateNumber((double)*(const uint64_t *)p);
    case PROTOBUF_C_TYPE_FLOAT: return cJSON_CreateNumber(*(const float *)p);
    case PROTOBUF_C_TYPE_DOUBLE: return cJSON_CreateNumber(*(const double *)p);
    case PROTOBUF_C_TYPE_BOOL: return cJSON_CreateBool(*(const protobuf_c_boolean *)p);
    case PROTOBUF_C_TYPE_ENUM: {
        const ProtobufCEnumValue *v =
            protobuf_c_enum_descriptor_get_value(f->descriptor, *(const int *)p);

        return v ? cJSON_CreateString(v->name) : cJSON_CreateNumber(*(const int *)p);
    }
    case PROTOBUF_C_TYPE_STRING: {
        const char *s = *(char *const *)p;

        return cJSON_CreateString(s ? s : "");
    }
    case PROTOBUF_C_TYPE_BYTES: return cJSON_CreateString(""); /* none in these messages */
    case PROTOBUF_C_TYPE_MESSAGE: {
        const ProtobufCMessage *sub = *(ProtobufCMessage *const *)p;

        return sub ? restjson_pb(sub) : cJSON_CreateNull();
    }
    }
    return cJSON_CreateNull();
}

static size_t pb_size(const ProtobufCFieldDescriptor *f)
{
    switch (f->type) {
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64:
    case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_FIXED64:
    case PROTOBUF_C_TYPE_DOUBLE: return 8;
    case PROTOBUF_C_TYPE_STRING:
    case PROTOBUF_C_TYPE_MESSAGE: return sizeof(void *);
    case PROTOBUF_C_TYPE_BYTES: return sizeof(ProtobufCBinaryData);
    case PROTOBUF_C_TYPE_BOOL: return sizeof(protobuf_c_boolean);
    default: return 4;
    }
}

/* A map's entry message: fields key and value, and nothing else. */
static int pb_is_entry(const ProtobufCMessageDescriptor *d)
{
    return d->n_fields == 2 && strcmp(d->fields[0].name, "key") == 0 &&
           strcmp(d->fields[1].name, "value") == 0;
}

cJSON *restjson_pb(const ProtobufCMessage *m)
{
    const ProtobufCMessageDescriptor *d = m->descriptor;
    const char *base = (const char *)m;
    cJSON *j;

    if (strcmp(d->name, "inference.InferParameter") == 0) { /* its value, bare */
        for (unsigned i = 0; i < d->n_fields; i++) {
            const ProtobufCFieldDescriptor *f = &d->fields[i];

            if (*(const uint32_t *)(base + f->quantifier_offset) == f->id)
                return pb_value(f, base + f->offset);
        }
        return cJSON_CreateNull();
    }
    j = cJSON_CreateObject();
    for (unsigned i = 0; j && i < d->n_fields; i++) {
        const ProtobufCFieldDescriptor *f = &d->fields[i];
        const char *p = base + f->offset;
        cJSON *v;

        if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) {
            if (*(const uint32_t *)(base + f->quantifier_offset) != f->id)
                continue;
        } else if (f->type == PROTOBUF_C_TYPE_MESSAGE && f->label != PROTOBUF_C_LABEL_REPEATED &&
                   !*(ProtobufCMessage *const *)p) {
            continue; /* an unset message */
        }
        if (f->label == PROTOBUF_C_LABEL_REPEATED) {
            size_t n = *(const size_t *)(base + f->quantifier_offset);
            const char *arr = *(const char *const *)p;
            int map = f->type == PROTOBUF_C_TYPE_MESSAGE &&
                      pb_is_entry((const ProtobufCMessageDescriptor *)f->descriptor);

            v = map ? cJSON_CreateObject() : cJSON_CreateArray();
            for (size_t k = 0; v && k < n; k++) {
                const char *e = arr + k * pb_size(f);

                if (map) {
                    const ProtobufCMessage *en = *(ProtobufCMessage *const *)e;
                    const ProtobufCMessageDescriptor *ed = en->descriptor;
                    const char *key = *(char *const *)((const char *)en + ed->fields[0].offset);

                    cJSON_AddItemToObject(
                        v, key ? key : "",
                        pb_value(&ed->fields[1], (const char *)en + ed->fields[1].offset));
                } else {
                    cJSON_AddItemToArray(v, pb_value(f, e));
                }
            }
        } else {
            v = pb_value(f, p);
        }
        cJSON_AddItemToObject(j, f->name, v);
    }
    return j;
}
