/* test_restjson.c -- the REST API's JSON. Requests: JSON data flat and nested, binary data after
 * a header of Inference-Header-Content-Length bytes, shared-memory parameters, the timeout and
 * the binary-output switches (per output over the request's), each read into exactly what
 * infer_validate sees over gRPC; then one bad thing at a time, each refused with TP_EINVAL (or
 * TP_ENOTFOUND for the model) and a message that names it. FP16 on the wire: binary only, both
 * ways. Answers: the header parses back, its shape is the input's leading dims then out, FP32
 * data reads back to the same floats (9 digits; a million random floats too) and a non-finite
 * value is refused. Messages:
 * int64 fields as numbers, enums by name, maps as objects, InferParameters as bare values. The
 * HTTP status of every gRPC code. */
#include "grpc_service.pb-c.h"
#include "layer.h"
#include "restjson.h"
#include "test.h"

static const struct model f32 = TEST_LAYER(TP_F32);

static int parse(const struct model *m, const char *body, size_t len, const char *hl,
                 struct restjson_infer *r, struct tp_err *err)
{
    *err = (struct tp_err){0};
    return restjson_infer(m, "lin", "", body, len, hl, NULL, r, err);
}

static void refused(const struct model *m, const char *body, const char *needle)
{
    struct restjson_infer r;
    struct tp_err err;

    if (parse(m, body, strlen(body), NULL, &r, &err) == 0)
        TEST_FAIL_("accepted: %s", body);
    ASSERT_EQ(err.code, TP_EINVAL);
    ASSERT_STR_HAS(err.msg, needle);
    restjson_infer_free(&r);
}

static void test_json_data(void)
{
    const char *flat = "{\"id\": \"r\\u00e9-1\", \"inputs\": [{\"name\": \"input\", \"shape\": "
                       "[2, 3], \"datatype\": \"FP32\", \"data\": [1, 2.5, -3, 4e-3, 5, 6]}]}";
    const char *nested = "{\"inputs\": [{\"name\": \"input\", \"shape\": [1, 2, 3], "
                         "\"datatype\": \"FP32\", \"data\": [[[1, 2.5, -3], [4e-3, 5, 6]]]}], "
                         "\"parameters\": {\"binary_data_output\": true, \"timeout\": 250}}";
    const float want[6] = {1, 2.5f, -3, 4e-3f, 5, 6};
    struct restjson_infer r;
    struct tp_err err;

    ASSERT_EQ(parse(&f32, flat, strlen(flat), NULL, &r, &err), 0);
    ASSERT_STR_EQ(r.id, "r\xc3\xa9-1");
    ASSERT_EQ(r.in.rows, 2);
    ASSERT_EQ(r.in.nlead, 1);
    ASSERT_TRUE(r.in.x == r.xs);
    for (int i = 0; i < 6; i++)
        ASSERT_TRUE(r.xs[i] == want[i]);
    ASSERT_EQ(r.binary_out, 0);
    ASSERT_EQ(r.timeout_us, 0);
    restjson_infer_free(&r);
    ASSERT_EQ(parse(&f32, nested, strlen(nested), NULL, &r, &err), 0);
    ASSERT_EQ(r.in.rows, 2);
    ASSERT_EQ(r.in.nlead, 2);
    ASSERT_EQ(r.in.lead[0], 1);
    ASSERT_EQ(r.in.lead[1], 2);
    for (int i = 0; i < 6; i++)
        ASSERT_TRUE(r.xs[i] == want[i]);
    ASSERT_EQ(r.binary_out, 1);
    ASSERT_EQ(r.timeout_us, 250);
    ASSERT_STR_EQ(r.id, "");
    restjson_infer_free(&r);
}

/* The data array is read apart from cJSON, each number by strtof: rounded once, to the nearest
 * float. Through a double, 1 + 2^-24 + 1e-25 (just above the midpoint of 1 and the next float)
 * would round to the midpoint and then, ties to even, down to 1. An escaped key before the array
 * leaves the request to cJSON, which reads it all the same. */
static void test_data_read_apart(void)
{
    const char *body = "{\"inputs\": [{\"name\": \"input\", \"datatype\": \"FP32\", \"data\": "
                       "[1.0000000596046447753906251, -0, 5e-1], \"shape\": [1, 3]}]}";
    const char *escaped = "{\"\\u0069nputs\": [{\"name\": \"input\", \"shape\": [1, 3], "
                          "\"datatype\": \"FP32\", \"data\": [[0.25], [2, 3]]}]}";
    struct restjson_infer r;
    struct tp_err err;

    ASSERT_EQ(parse(&f32, body, strlen(body), NULL, &r, &err), 0);
    ASSERT_TRUE(r.xs[0] == nextafterf(1.0f, 2.0f));
    ASSERT_TRUE(r.xs[1] == 0 && signbit(r.xs[1]));
    ASSERT_TRUE(r.xs[2] == 0.5f);
    restjson_infer_free(&r);
    ASSERT_EQ(parse(&f32, escaped, strlen(escaped), NULL, &r, &err), 0);
    ASSERT_TRUE(r.xs[0] == 0.25f && r.xs[1] == 2 && r.xs[2] == 3);
    restjson_infer_free(&r);
    /* what the scan does not take, cJSON refuses with its reason */
    refused(&f32,
            "{\"inputs\": [{\"name\": \"input\", \"shape\": [1, 3], \"datatype\": \"FP32\", "
            "\"data\": [1, 2, .5]}]}",
            "not valid JSON");
    refused(&f32,
            "{\"inputs\": [{\"name\": \"input\", \"shape\": [1, 3], \"datatype\": \"FP32\", "
            "\"data\": [1, 2, 3]}], }",
            "not valid JSON");
}

/* body = JSON header + data; returns its length */
static size_t binary_body(char *body, const char *header, const void *data, size_t n, char *hl)
{
    size_t h = strlen(header);

    memcpy(body, header, h);
    memcpy(body + h, data, n);
    sprintf(hl, "%zu", h);
    return h + n;
}

static void test_binary_data(void)
{
    const float x[3] = {0.5f, -1, 2};
    const char *header = "{\"inputs\": [{\"name\": \"input\", \"shape\": [1, 3], \"datatype\": "
                         "\"FP32\", \"parameters\": {\"binary_data_size\": 12}}], \"outputs\": "
                         "[{\"name\": \"output\", \"parameters\": {\"binary_data\": false}}], "
                         "\"parameters\": {\"binary_data_output\": true}}";
    char body[512], hl[32];
    size_t len = binary_body(body, header, x, sizeof(x), hl);
    struct restjson_infer r;
    struct tp_err err;

    ASSERT_EQ(parse(&f32, body, len, hl, &r, &err), 0);
    ASSERT_TRUE(r.in.x == body + strlen(header)); /* left in the body */
    ASSERT_TRUE(r.xs == NULL);
    ASSERT_EQ(r.in.rows, 1);
    ASSERT_EQ(r.binary_out, 0); /* the output's own switch wins */
    restjson_infer_free(&r);
    /* a byte short, a byte over, a header length past the body, or not a number */
    ASSERT_EQ(parse(&f32, body, len - 1, hl, &r, &err), -1);
    ASSERT_STR_HAS(err.msg, "binary_data_size 12 is more than the 11 bytes");
    restjson_infer_free(&r);
    body[len] = 0;
    ASSERT_EQ(parse(&f32, body, len + 1, hl, &r, &err), -1);
    ASSERT_STR_HAS(err.msg, "1 bytes after");
    restjson_infer_free(&r);
    ASSERT_EQ(parse(&f32, body, len, "9999", &r, &err), -1);
    ASSERT_STR_HAS(err.msg, "Inference-Header-Content-Length '9999'");
    restjson_infer_free(&r);
    ASSERT_EQ(parse(&f32, body, len, "-1", &r, &err), -1);
    restjson_infer_free(&r);
    ASSERT_EQ(parse(&f32, body, len, "", &r, &err), -1);
    restjson_infer_free(&r);
    /* the wrong byte count for the shape: infer_validate's rule */
    len = binary_body(body,
                      "{\"inputs\": [{\"name\": \"input\", \"shape\": [1, 3], \"datatype\": "
                      "\"FP32\", \"parameters\": {\"binary_data_size\": 8}}]}",
                      x, 8, hl);
    ASSERT_EQ(parse(&f32, body, len, hl, &r, &err), -1);
    ASSERT_STR_HAS(err.msg, "needs 12 bytes");
    restjson_infer_free(&r);
    ASSERT_EQ(restjson_infer(&f32, "lin", "", body, len, hl, "br", &r, &err), -1);
    ASSERT_STR_HAS(err.msg, "Content-Encoding 'br'");
    restjson_infer_free(&r);
}

static void test_shared_memory(void)
{
    const char *body = "{\"inputs\": [{\"name\": \"input\", \"shape\": [2, 3], \"datatype\": "
                       "\"FP32\", \"parameters\": {\"shared_memory_region\": \"in\", "
                       "\"shared_memory_byte_size\": 24, \"shared_memory_offset\": 8}}], "
                       "\"outputs\": [{\"name\": \"output\", \"parameters\": "
                       "{\"shared_memory_region\": \"out\", \"shared_memory_byte_size\": 16}}]}";
    char big[600];
    struct restjson_infer r;
    struct tp_err err;

    ASSERT_EQ(parse(&f32, body, strlen(body), NULL, &r, &err), 0);
    ASSERT_STR_EQ(r.in.in_region, "in");
    ASSERT_TRUE(r.in.in_region == r.in_region);
    ASSERT_EQ(r.in.in_offset, 8);
    ASSERT_STR_EQ(r.in.out_region, "out");
    ASSERT_TRUE(r.in.x == NULL);
    restjson_infer_free(&r);
    refused(&f32,
            "{\"inputs\": [{\"name\": \"input\", \"shape\": [2, 3], \"datatype\": \"FP32\", "
            "\"parameters\": {\"shared_memory_region\": \"in\", \"shared_memory_byte_size\": "
            "\"24\"}}]}",
            "shared_memory_byte_size must be an integer");
    refused(&f32,
            "{\"inputs\": [{\"name\": \"input\", \"shape\": [1, 3], \"datatype\": \"FP32\", "
            "\"data\": [1, 2, 3]}], \"outputs\": [{\"name\": \"output\", \"parameters\": "
            "{\"shared_memory_region\": \"out\", \"shared_memory_byte_size\": 8, "
            "\"binary_data\": true}}]}",
            "also asks for binary data");
    snprintf(big, sizeof(big),
             "{\"inputs\": [{\"name\": \"input\", \"shape\": [2, 3], \"datatype\": \"FP32\", "
             "\"parameters\": {\"shared_memory_region\": \"%0200d\", "
             "\"shared_memory_byte_size\": 24}}]}",
             7);
    refused(&f32, big, "more than 127 bytes");
}

static void test_refusals(void)
{
    static const char *const cases[][2] = {
        {"", "not valid JSON"},
        {"{\"inputs\": [", "not valid JSON"},
        {"{\"inputs\": []} {}", "not valid JSON"},
        {"[]", "JSON object"},
        {"{\"id\": 5, \"inputs\": []}", "'id' must be a string"},
        {"{\"inputs\": {}}", "'inputs' must be an array"},
        {"{\"inputs\": []}", "expected 1 input, got 0"},
        {"{\"inputs\": [5]}", "inputs[0] must be an object"},
        {"{\"inputs\": [{\"name\": \"input\", \"shape\": [1, 3], \"datatype\": \"FP32\"}]}",
         "has no data"},
        {"{\"inputs\": [{\"name\": \"x\", \"shape\": [1, 3], \"datatype\": \"FP32\", \"data\": "
         "[1, 2, 3]}]}",
         "unexpected input 'x'"},
        {"{\"inputs\": [{\"name\": \"input\", \"shape\": [1, 3.5], \"datatype\": \"FP32\", "
         "\"data\": [1, 2, 3]}]}",
         "shape[1] is not an integer"},
        {"{\"inputs\": [{\"name\": \"input\", \"shape\": [1, 1, 1, 1, 1, 3], \"datatype\": "
         "\"FP32\", \"data\": [1, 2, 3]}]}",
         "at most 4 are accepted"},
        {"{\"inputs\": [{\"name\": \"input\", \"shape\": [5, 3], \"datatype\": \"FP32\", "
         "\"data\": [1, 2, 3]}]}",
         "1 to 4 rows"},
        {"{\"inputs\": [{\"name\": \"input\", \"shape\": [1, 3], \"datatype\": \"FP32\", "
         "\"data\": [1, 2]}]}",
         "needs 3 fp32_contents, got 2"},
        {"{\"inputs\": [{\"name\": \"input\", \"shape\": [1, 3], \"datatype\": \"FP32\", "
         "\"data\": [1, 2, true]}]}",
         "data[2] is not a number"},
        {"{\"inputs\": [{\"name\": \"input\", \"shape\": [1, 3], \"datatype\": \"FP32\", "
         "\"data\": [1, 2, 1e39]}]}",
         "out of FP32's range"},
        {"{\"inputs\": [{\"name\": \"input\", \"shape\": [1, 3], \"datatype\": \"FP32\", "
         "\"data\": [[[[[1, 2, 3]]]]]}]}",
         "deeper than 4"},
        {"{\"inputs\": [{\"name\": \"input\", \"shape\": [1, 3], \"datatype\": \"FP32\", "
         "\"data\": [1, 2, 3], \"parameters\": {\"binary_data_size\": 12}}]}",
         "both binary_data_size and 'data'"},
        {"{\"inputs\": [{\"name\": \"input\", \"shape\": [1, 3], \"datatype\": \"INT8\", "
         "\"data\": [1, 2, 3]}]}",
         "datatype 'INT8'"},
        {"{\"inputs\": [{\"name\": \"input\", \"shape\": [1, 3], \"datatype\": \"FP32\", "
         "\"data\": [1, 2, 3]}], \"outputs\": [{\"name\": \"y\"}]}",
         "unknown requested output 'y'"},
        {"{\"inputs\": [{\"name\": \"input\", \"shape\": [1, 3], \"datatype\": \"FP32\", "
         "\"data\": [1, 2, 3]}], \"outputs\": [{\"name\": \"output\", \"parameters\": "
         "{\"classification\": 2}}]}",
         "classification is not supported"},
        {"{\"inputs\": [{\"name\": \"input\", \"shape\": [1, 3], \"datatype\": \"FP32\", "
         "\"data\": [1, 2, 3]}], \"parameters\": {\"timeout\": -1}}",
         "timeout must be an integer"},
        {"{\"inputs\": [{\"name\": \"input\", \"shape\": [1, 3], \"datatype\": \"FP32\", "
         "\"data\": [1, 2, 3]}], \"parameters\": {\"binary_data_output\": 1}}",
         "binary_data_output must be a boolean"},
        {"{\"id\": \"a\\u0000b\", \"inputs\": []}", "\\u0000"},
        {"{\"id\": \"\xc0\xaf\", \"inputs\": []}", "not UTF-8"},
        {"{\"id\": \"\xed\xa0\x80\", \"inputs\": []}", "not UTF-8"},
        {"{\"id\": \"\xf4\x90\x80\x80\", \"inputs\": []}", "not UTF-8"},
        {"{\"id\": \"\xe2\x82\", \"inputs\": []}", "not UTF-8"},
    };
    struct restjson_infer r;
    struct tp_err err;
    const char *other = "{\"inputs\": []}";

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        refused(&f32, cases[i][0], cases[i][1]);
    ASSERT_EQ(restjson_infer(&f32, "other", "", other, strlen(other), NULL, NULL, &r, &err), -1);
    ASSERT_EQ(err.code, TP_ENOTFOUND);
    restjson_infer_free(&r);
    ASSERT_EQ(restjson_infer(&f32, "lin", "2", other, strlen(other), NULL, NULL, &r, &err), -1);
    ASSERT_EQ(err.code, TP_ENOTFOUND);
    restjson_infer_free(&r);
}

static void test_fp16(void)
{
    struct model m = f32;
    const uint16_t h[3] = {0x3c00, 0x4000, 0xc000};
    const char *header = "{\"inputs\": [{\"name\": \"input\", \"shape\": [1, 3], \"datatype\": "
                         "\"FP16\", \"parameters\": {\"binary_data_size\": 6}}], "
                         "\"parameters\": {\"binary_data_output\": true}}";
    char body[512], hl[32];
    size_t len = binary_body(body, header, h, sizeof(h), hl);
    struct restjson_infer r;
    struct tp_err err;

    m.io_dtype = TP_F16;
    ASSERT_EQ(parse(&m, body, len, hl, &r, &err), 0);
    ASSERT_TRUE(r.in.x == body + strlen(header));
    restjson_infer_free(&r);
    refused(&m,
            "{\"inputs\": [{\"name\": \"input\", \"shape\": [1, 3], \"datatype\": \"FP16\", "
            "\"data\": [1, 2, 3]}]}",
            "JSON data carries FP32 only");
    len = binary_body(body,
                      "{\"inputs\": [{\"name\": \"input\", \"shape\": [1, 3], \"datatype\": "
                      "\"FP16\", \"parameters\": {\"binary_data_size\": 6}}]}",
                      h, sizeof(h), hl);
    ASSERT_EQ(parse(&m, body, len, hl, &r, &err), -1);
    ASSERT_STR_HAS(err.msg, "ask for it as binary data");
    restjson_infer_free(&r);
}

/* The answer's JSON, parsed back. */
static cJSON *answer(const struct infer_input *in, const float *y, size_t binary, char **text)
{
    size_t n = 0;
    FILE *f = open_memstream(text, &n);
    struct tp_err err;
    int rc;
    cJSON *j;

    ASSERT_TRUE(f != NULL);
    rc = restjson_answer(f, &f32, "id\"7", in, y, binary);
    fclose(f);
    if (rc < 0)
        return NULL;
    j = restjson_parse(*text, n, "answer", &err);
    if (!j)
        TEST_FAIL_("%s: %s", err.msg, *text);
    return j;
}

static void test_answers(void)
{
    struct infer_input in = {.rows = 6, .nlead = 2, .lead = {2, 3}};
    float y[12] = {1.0f / 3, -2.5e-38f, 3.4028235e38f, 1e-45f, 0, -0.0f, 123456789.0f, 7, 8,
                   9,        10,        0.1f};
    char *text = NULL;
    cJSON *j = answer(&in, y, (size_t)-1, &text), *o, *d;
    int k = 0;

    ASSERT_STR_EQ(cJSON_GetObjectItem(j, "model_name")->valuestring, "lin");
    ASSERT_STR_EQ(cJSON_GetObjectItem(j, "id")->valuestring, "id\"7");
    o = cJSON_GetArrayItem(cJSON_GetObjectItem(j, "outputs"), 0);
    ASSERT_STR_EQ(cJSON_GetObjectItem(o, "datatype")->valuestring, "FP32");
    d = cJSON_GetObjectItem(o, "shape");
    ASSERT_EQ(cJSON_GetArraySize(d), 3);
    ASSERT_EQ(cJSON_GetArrayItem(d, 2)->valuedouble, 2);
    d = cJSON_GetObjectItem(o, "data");
    ASSERT_EQ(cJSON_GetArraySize(d), 12);
    for (cJSON *v = d->child; v; v = v->next, k++) /* 9 digits: the same float back */
        if ((float)v->valuedouble != y[k] || signbit((float)v->valuedouble) != signbit(y[k]))
            TEST_FAIL_("value %d: %.9g came back as %.17g", k, (double)y[k], v->valuedouble);
    ASSERT_TRUE(cJSON_GetObjectItem(o, "parameters") == NULL);
    cJSON_Delete(j);
    free(text);
    text = NULL;
    j = answer(&in, NULL, 48, &text);
    o = cJSON_GetArrayItem(cJSON_GetObjectItem(j, "outputs"), 0);
    ASSERT_TRUE(cJSON_GetObjectItem(o, "data") == NULL);
    ASSERT_EQ(
        cJSON_GetObjectItem(cJSON_GetObjectItem(o, "parameters"), "binary_data_size")->valuedouble,
        48);
    cJSON_Delete(j);
    free(text);
    text = NULL;
    y[5] = INFINITY;
    ASSERT_TRUE(answer(&in, y, (size_t)-1, &text) == NULL);
    y[5] = NAN;
    free(text);
    text = NULL;
    ASSERT_TRUE(answer(&in, y, (size_t)-1, &text) == NULL);
    free(text);
}

/* Every float class, and a million random bit patterns: the same float back, in at most
 * RESTJSON_F32_MAX bytes, as JSON numbers (a digit first, after any minus sign). */
static void test_f32_round_trip(void)
{
    static const float edge[] = {
        0.0f,          -0.0f,          1.0f, -1.0f, 1e-45f,        -1e-45f, 1.17549435e-38f,
        3.4028235e38f, -3.4028235e38f, 0.1f, 1e-5f, 9.9999999e-6f, 1e9f,    999999999.0f,
        123456789.0f,  16777217.0f,    0.3f, 2.5f};
    uint64_t x = 0x9e3779b97f4a7c15u;
    char buf[RESTJSON_F32_MAX + 1];

    for (size_t i = 0; i < sizeof(edge) / sizeof(edge[0]) + 1000000; i++) {
        float f, g;
        uint32_t bits;
        size_t n;

        if (i < sizeof(edge) / sizeof(edge[0])) {
            f = edge[i];
        } else {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            bits = (uint32_t)(x >> 11);
            memcpy(&f, &bits, 4);
            if (!isfinite(f))
                continue;
        }
        n = restjson_f32(buf, f);
        ASSERT_LE(n, RESTJSON_F32_MAX);
        buf[n] = '\0';
        ASSERT_TRUE((buf[0] >= '0' && buf[0] <= '9') || (buf[0] == '-' && buf[1] >= '0'));
        g = strtof(buf, NULL);
        if (memcmp(&f, &g, 4) != 0)
            TEST_FAIL_("%.9g written as %s reads back as %.9g", (double)f, buf, (double)g);
    }
}

static void test_messages(void)
{
    Inference__ModelConfig mc = INFERENCE__MODEL_CONFIG__INIT;
    Inference__ModelInput in = INFERENCE__MODEL_INPUT__INIT, *ins[1] = {&in};
    Inference__ModelMetadataResponse md = INFERENCE__MODEL_METADATA_RESPONSE__INIT;
    Inference__ModelMetadataResponse__ParametersEntry e[2], *ep[2] = {&e[0], &e[1]};
    Inference__InferParameter pv[2] = {INFERENCE__INFER_PARAMETER__INIT,
                                       INFERENCE__INFER_PARAMETER__INIT};
    int64_t dims[1] = {(int64_t)1 << 40};
    cJSON *j, *v;

    mc.name = "lin";
    mc.max_batch_size = 64;
    in.name = "input";
    in.data_type = INFERENCE__DATA_TYPE__TYPE_BF16;
    in.n_dims = 1;
    in.dims = dims;
    mc.n_input = 1;
    mc.input = ins;
    j = restjson_pb(&mc.base);
    ASSERT_EQ(cJSON_GetObjectItem(j, "max_batch_size")->valuedouble, 64);
    ASSERT_TRUE(cJSON_GetObjectItem(j, "dynamic_batching") == NULL); /* an unset message */
    v = cJSON_GetArrayItem(cJSON_GetObjectItem(j, "input"), 0);
    ASSERT_STR_EQ(cJSON_GetObjectItem(v, "data_type")->valuestring, "TYPE_BF16");
    ASSERT_TRUE(cJSON_GetArrayItem(cJSON_GetObjectItem(v, "dims"), 0)->valuedouble ==
                (double)((int64_t)1 << 40));
    ASSERT_TRUE(cJSON_IsArray(cJSON_GetObjectItem(j, "output"))); /* empty, but there */
    cJSON_Delete(j);
    for (int i = 0; i < 2; i++)
        e[i] = (Inference__ModelMetadataResponse__ParametersEntry)
            INFERENCE__MODEL_METADATA_RESPONSE__PARAMETERS_ENTRY__INIT;
    e[0].key = "ranks";
    e[0].value = &pv[0];
    pv[0].parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_INT64_PARAM;
    pv[0].int64_param = 3;
    e[1].key = "split";
    e[1].value = &pv[1];
    pv[1].parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_STRING_PARAM;
    pv[1].string_param = "334,333,333";
    md.name = "lin";
    md.n_parameters = 2;
    md.parameters = ep;
    j = restjson_pb(&md.base);
    v = cJSON_GetObjectItem(j, "parameters");
    ASSERT_TRUE(cJSON_IsObject(v));
    ASSERT_EQ(cJSON_GetObjectItem(v, "ranks")->valuedouble, 3);
    ASSERT_STR_EQ(cJSON_GetObjectItem(v, "split")->valuestring, "334,333,333");
    cJSON_Delete(j);
}

static void test_clean_utf8(void)
{
    char a[] = "unknown model 'caf\xc3\xa9'", b[] = "cut '\xe2\x82'", c[] = "x\xff\xc0\xafy\xe2";

    restjson_clean_utf8(a);
    ASSERT_STR_EQ(a, "unknown model 'caf\xc3\xa9'");
    restjson_clean_utf8(b);
    ASSERT_STR_EQ(b, "cut '?"
                     "?'"); /* apart: "??'" is a trigraph */
    restjson_clean_utf8(c);
    ASSERT_STR_EQ(c, "x?"
                     "?"
                     "?y?");
}

static void test_statuses(void)
{
    static const unsigned want[17] = {200, 400, 400, 400, 504, 404, 400, 400, 429,
                                      400, 400, 400, 501, 500, 503, 400, 400};

    for (int c = 0; c < 17; c++)
        ASSERT_EQ(restjson_status(c), want[c]);
    ASSERT_EQ(restjson_status(tp_code_grpc(TP_EBUSY)), 429);
    ASSERT_EQ(restjson_status(tp_code_grpc(TP_EUNAVAIL)), 503);
}

int main(void)
{
    TEST_RUN(test_json_data);
    TEST_RUN(test_data_read_apart);
    TEST_RUN(test_binary_data);
    TEST_RUN(test_shared_memory);
    TEST_RUN(test_refusals);
    TEST_RUN(test_fp16);
    TEST_RUN(test_answers);
    TEST_RUN(test_f32_round_trip);
    TEST_RUN(test_messages);
    TEST_RUN(test_clean_utf8);
    TEST_RUN(test_statuses);
    return 0;
}
