use super::*;
use crate::config::Dtype;
use crate::error::{DsoptError, EXIT_BAD_INPUT};
use crate::nn::moe::ScoreFunc;

fn preset(name: &str) -> DeepseekConfig {
    presets::find(name).expect("preset exists").config()
}

fn json(name: &str) -> serde_json::Map<String, serde_json::Value> {
    match serde_json::from_str(presets::find(name).unwrap().config_json).unwrap() {
        serde_json::Value::Object(m) => m,
        _ => unreachable!(),
    }
}

fn parse_map(m: &serde_json::Map<String, serde_json::Value>) -> Result<DeepseekConfig, DsoptError> {
    parse_config(
        "test/config.json",
        &serde_json::Value::Object(m.clone()).to_string(),
    )
}

/// The key an error names, and that it is bad input (exit 2) mentioning the file.
fn bad_key(r: Result<DeepseekConfig, DsoptError>) -> String {
    let e = r.expect_err("must be refused");
    assert_eq!(e.exit_code(), EXIT_BAD_INPUT, "{e}");
    assert!(e.to_string().contains("test/config.json"), "{e}");
    match e {
        DsoptError::Model { key, .. } => key.unwrap_or_default(),
        other => panic!("not a model error: {other}"),
    }
}

#[test]
fn every_preset_parses_and_passes_its_checks() {
    for p in PRESETS {
        let c = p.config();
        assert!(c.check().is_ok(), "{}", p.name);
        assert_eq!(c.kv_lora_rank, 512, "{}", p.name);
        assert_eq!(c.qk_rope_head_dim, 64, "{}", p.name);
    }
}

#[test]
fn preset_parameter_counts_equal_the_published_totals() {
    // published: V2-Lite 15.7B total; V2 236B / 21B active; V3 671B / 37B active (without the
    // 14B MTP module); Moonlight 16B / 3B active
    let b = |x: u128| x as f64 / 1e9;
    let v2l = preset("deepseek-v2-lite").param_count();
    assert!((b(v2l.total) - 15.7).abs() < 0.05, "{}", b(v2l.total));
    let v2 = preset("deepseek-v2").param_count();
    assert!((b(v2.total) - 236.0).abs() < 0.5, "{}", b(v2.total));
    assert!((b(v2.active) - 21.0).abs() < 0.5, "{}", b(v2.active));
    let v3 = preset("deepseek-v3").param_count();
    assert!((b(v3.total) - 671.0).abs() < 0.5, "{}", b(v3.total));
    assert!((b(v3.active) - 37.0).abs() < 1.0, "{}", b(v3.active));
    // one MTP layer: a full MoE block plus eh_proj, norms and its own head
    assert!(b(v3.mtp) > 11.5 && b(v3.mtp) < 14.5, "{}", b(v3.mtp));
    let ml = preset("moonlight-16b-a3b").param_count();
    assert!((b(ml.total) - 16.0).abs() < 0.1, "{}", b(ml.total));
    assert!((b(ml.active) - 3.0).abs() < 0.15, "{}", b(ml.active));
    assert_eq!(v2l.mtp, 0);
    // bf16 bytes of V2-Lite: about 31.4 GB (REFERENCE: about 29 GB = 29 GiB of tensors)
    let bytes = preset("deepseek-v2-lite").weight_bytes(Dtype::Bf16);
    assert_eq!(bytes, v2l.total * 2);
}

#[test]
fn presets_carry_the_architecture_switches() {
    let v2l = preset("deepseek-v2-lite");
    assert_eq!(v2l.model_type, ModelType::DeepseekV2);
    assert_eq!(v2l.q_lora_rank, None);
    let y = v2l.rope_scaling.expect("yarn");
    assert_eq!((y.factor, y.mscale_all_dim), (40.0, Some(0.707)));
    let m = v2l.moe.as_ref().unwrap();
    assert_eq!(
        (m.scoring_func, m.topk_method),
        (ScoreFunc::Softmax, TopkMethod::Greedy)
    );
    assert_eq!(v2l.dtype, Some(Dtype::Bf16));
    let v2 = preset("deepseek-v2");
    let m = v2.moe.as_ref().unwrap();
    assert_eq!(m.topk_method, TopkMethod::GroupLimitedGreedy);
    assert_eq!(
        (m.n_group, m.topk_group, m.routed_scaling_factor),
        (8, 3, 16.0)
    );
    let v3 = preset("deepseek-v3");
    assert_eq!(v3.q_lora_rank, Some(1536));
    assert_eq!(v3.first_k_dense_replace, 3);
    assert_eq!(v3.num_nextn_predict_layers, 1);
    assert_eq!(v3.quantization, Some(Fp8Blocks { block: [128, 128] }));
    let m = v3.moe.as_ref().unwrap();
    assert_eq!(
        (m.scoring_func, m.topk_method),
        (ScoreFunc::Sigmoid, TopkMethod::NoauxTc)
    );
    assert!(m.norm_topk_prob);
    let ml = preset("moonlight-16b-a3b");
    assert_eq!(ml.rms_norm_eps, 1e-5);
    assert_eq!(ml.rope_theta, 50000.0);
    assert_eq!(ml.rope_scaling, None);
}

#[test]
fn both_rope_forms_give_the_same_model() {
    let old = json("deepseek-v3");
    let mut new = old.clone();
    let mut params = new
        .remove("rope_scaling")
        .unwrap()
        .as_object()
        .unwrap()
        .clone();
    params.remove("type");
    params.insert("rope_type".into(), "yarn".into());
    let theta = new.remove("rope_theta").unwrap();
    params.insert("rope_theta".into(), theta);
    new.insert("rope_parameters".into(), params.into());
    // newer saves: head_dim is the RoPE width, and `dtype` replaces `torch_dtype`
    new.insert("head_dim".into(), 64.into());
    let dtype = new.remove("torch_dtype").unwrap();
    new.insert("dtype".into(), dtype);
    assert_eq!(parse_map(&old).unwrap(), parse_map(&new).unwrap());
    // the rope_type spelling of the old form too
    let mut alt = old.clone();
    let rs = alt
        .get_mut("rope_scaling")
        .unwrap()
        .as_object_mut()
        .unwrap();
    rs.remove("type");
    rs.insert("rope_type".into(), "yarn".into());
    assert_eq!(parse_map(&old).unwrap(), parse_map(&alt).unwrap());
    // plain RoPE in the new form
    let mut plain = json("moonlight-16b-a3b");
    plain.remove("rope_scaling");
    plain.insert(
        "rope_parameters".into(),
        serde_json::json!({"rope_type": "default", "rope_theta": 50000.0}),
    );
    plain.remove("rope_theta");
    assert_eq!(parse_map(&plain).unwrap(), preset("moonlight-16b-a3b"));
}

#[test]
fn query_compression_null_or_absent_means_none_and_zero_is_refused() {
    let mut m = json("deepseek-v2-lite");
    m.remove("q_lora_rank");
    assert_eq!(parse_map(&m).unwrap().q_lora_rank, None);
    m.insert("q_lora_rank".into(), 0.into());
    assert_eq!(bad_key(parse_map(&m)), "q_lora_rank");
}

#[test]
fn keys_that_do_not_change_the_computation_are_ignored() {
    let mut m = json("deepseek-v3");
    for (k, v) in [
        ("bos_token_id", serde_json::json!(0)),
        ("eos_token_id", serde_json::json!(1)),
        ("initializer_range", serde_json::json!(0.02)),
        ("transformers_version", serde_json::json!("4.99")),
        ("auto_map", serde_json::json!({"AutoConfig": "x"})),
        ("some_future_key", serde_json::json!([1, 2])),
    ] {
        m.insert(k.into(), v);
    }
    assert_eq!(parse_map(&m).unwrap(), preset("deepseek-v3"));
}

#[test]
fn each_unsupported_value_exits_2_naming_its_key() {
    use serde_json::json;
    let cases: Vec<(&str, &str, serde_json::Value)> = vec![
        ("deepseek-v3", "model_type", json!("llama")),
        ("deepseek-v3", "hidden_act", json!("gelu")),
        ("deepseek-v3", "attention_bias", json!(true)),
        ("deepseek-v3", "tie_word_embeddings", json!(true)),
        ("deepseek-v3", "moe_layer_freq", json!(2)),
        ("deepseek-v3", "rope_interleave", json!(false)),
        ("deepseek-v3", "torch_dtype", json!("int8")),
        ("deepseek-v3", "topk_method", json!("greedy")),
        ("deepseek-v3", "scoring_func", json!("softmax")),
        ("deepseek-v2", "topk_method", json!("noaux_tc")),
        ("deepseek-v2", "topk_method", json!("best_k")),
        ("deepseek-v2", "scoring_func", json!("relu")),
        (
            "deepseek-v3",
            "quantization_config",
            json!({"quant_method": "gptq", "bits": 4}),
        ),
        ("deepseek-v3", "n_group", json!(7)),
        ("deepseek-v3", "topk_group", json!(9)),
        ("deepseek-v3", "first_k_dense_replace", json!(62)),
        ("deepseek-v3", "qk_rope_head_dim", json!(63)),
        ("deepseek-v3", "rms_norm_eps", json!(0)),
        ("deepseek-v3", "hidden_size", json!(-5)),
        ("deepseek-v3", "vocab_size", json!(1.5)),
    ];
    for (p, key, value) in cases {
        let mut m = json(p);
        m.insert(key.into(), value.clone());
        let named = bad_key(parse_map(&m));
        let want = match key {
            "scoring_func" if p == "deepseek-v3" => "topk_method",
            _ => key,
        };
        assert_eq!(named, want, "{p}: {key} = {value}");
    }
    // nested keys
    let mut m = json("deepseek-v3");
    m["quantization_config"]["weight_block_size"] = json!([64, 64]);
    assert_eq!(
        bad_key(parse_map(&m)),
        "quantization_config.weight_block_size"
    );
    let mut m = json("deepseek-v3");
    m["rope_scaling"]["type"] = json!("linear");
    assert_eq!(bad_key(parse_map(&m)), "rope_scaling.rope_type");
    let mut m = json("deepseek-v3");
    m["rope_scaling"].as_object_mut().unwrap().remove("factor");
    assert_eq!(bad_key(parse_map(&m)), "rope_scaling.factor");
    // a missing required key
    let mut m = json("deepseek-v3");
    m.remove("kv_lora_rank");
    assert_eq!(bad_key(parse_map(&m)), "kv_lora_rank");
}

#[test]
fn absurd_sizes_are_refused_before_anything_is_allocated() {
    use serde_json::json;
    for (key, value) in [
        ("n_routed_experts", json!(1_000_000_000_000u64)),
        ("vocab_size", json!(u64::MAX)),
        ("num_hidden_layers", json!(100_000)),
        ("hidden_size", json!(1e12)),
    ] {
        let mut m = json("deepseek-v3");
        m.insert(key.into(), value);
        assert_eq!(bad_key(parse_map(&m)), key);
    }
    // the largest sizes the limits allow still count without overflow
    let mut m = json("deepseek-v3");
    for (k, v) in [
        ("vocab_size", 4_194_304u64),
        ("hidden_size", 65_536),
        ("moe_intermediate_size", 1_048_576),
        ("n_routed_experts", 65_536),
        ("num_hidden_layers", 1_024),
        ("num_attention_heads", 1_024),
        ("n_group", 1),
        ("topk_group", 1),
    ] {
        m.insert(k.into(), v.into());
    }
    let c = parse_map(&m).unwrap();
    assert!(c.param_count().total > 1_000_000_000_000_000);
}

#[test]
fn not_json_and_oversized_files_are_bad_input() {
    let e = parse_config("x/config.json", "{ not json").unwrap_err();
    assert_eq!(e.exit_code(), EXIT_BAD_INPUT);
    assert!(e.to_string().contains("x/config.json"), "{e}");
    let e = parse_config("x/config.json", "[1, 2]").unwrap_err();
    assert_eq!(e.exit_code(), EXIT_BAD_INPUT);
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("config.json");
    std::fs::write(&big, vec![b' '; (1 << 20) + 1]).unwrap();
    let e = read_config_file(&big).unwrap_err();
    assert!(e.to_string().contains("bytes"), "{e}");
    let e = read_config_file(&dir.path().join("missing.json")).unwrap_err();
    assert_eq!(e.exit_code(), EXIT_BAD_INPUT);
}

#[test]
fn keeping_the_first_layers_keeps_the_dense_ones_first() {
    let v3 = preset("deepseek-v3");
    let two = v3.with_layers(2);
    assert_eq!((two.first_k_dense_replace, two.moe_layers()), (2, 0));
    let five = v3.with_layers(5);
    assert_eq!((five.first_k_dense_replace, five.moe_layers()), (3, 2));
    assert!(five.param_count().total < v3.param_count().total);
    assert_eq!(v3.moe_layers(), 58);
}

#[test]
fn resolve_takes_a_preset_or_a_directory() {
    let s = resolve("deepseek-v2-lite", Some(2)).unwrap();
    assert_eq!(s.source, ModelSource::Preset("deepseek-v2-lite".into()));
    assert_eq!((s.config.num_hidden_layers, s.total_layers), (2, 27));
    assert_eq!(
        s.describe(),
        "random weights, DeepSeek-V2-Lite dimensions, 2 of 27 layers"
    );
    // unknown names list the presets
    let e = resolve("deepseek-v4", None).unwrap_err();
    assert_eq!(e.exit_code(), EXIT_BAD_INPUT);
    for p in PRESETS {
        assert!(e.to_string().contains(p.name), "{e}");
    }
    // layers out of range
    assert_eq!(
        resolve("deepseek-v3", Some(0)).unwrap_err().exit_code(),
        EXIT_BAD_INPUT
    );
    assert_eq!(
        resolve("deepseek-v3", Some(62)).unwrap_err().exit_code(),
        EXIT_BAD_INPUT
    );
    // a directory: its config.json
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        presets::find("moonlight-16b-a3b").unwrap().config_json,
    )
    .unwrap();
    let s = resolve(dir.path().to_str().unwrap(), None).unwrap();
    assert_eq!(s.source, ModelSource::Dir(dir.path().to_path_buf()));
    assert_eq!(s.config, preset("moonlight-16b-a3b"));
    // a directory without config.json names the file
    let empty = tempfile::tempdir().unwrap();
    let e = resolve(empty.path().to_str().unwrap(), None).unwrap_err();
    assert!(e.to_string().contains("config.json"), "{e}");
}

/// Writes `tensors` (name, file entry, raw bytes) as one safetensors file.
fn write_safetensors(
    path: &std::path::Path,
    tensors: &[(String, safetensors::TensorInfo, Vec<u8>)],
) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, info, bytes) in tensors {
        let begin = data.len();
        data.extend_from_slice(bytes);
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": info.dtype.name(), "shape": info.shape, "data_offsets": [begin, data.len()]
            }),
        );
    }
    let h = serde_json::Value::Object(header).to_string();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(&data);
    std::fs::write(path, out).unwrap();
}

fn fixture_dir(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name)
}

/// Two shards and their index load exactly as the single file does; a missing shard, or a
/// tensor the index places in a shard that lacks it, exits 2 naming the file.
#[test]
fn a_sharded_checkpoint_loads_like_the_single_file() {
    let src = fixture_dir("v3-tiny");
    let config = read_config_file(&src.join("config.json")).unwrap();
    let single = load::Checkpoint::open(&src, &config).unwrap();
    let file = safetensors::SafeFile::open(&src.join("model.safetensors")).unwrap();
    let all: Vec<_> = file
        .tensors()
        .iter()
        .map(|(n, i)| (n.clone(), i.clone(), file.read_bytes(n).unwrap()))
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let (a, b) = all.split_at(all.len() / 2);
    let names = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    write_safetensors(&dir.join(names[0]), a);
    write_safetensors(&dir.join(names[1]), b);
    let map: serde_json::Map<String, serde_json::Value> = a
        .iter()
        .map(|t| (t.0.clone(), names[0].into()))
        .chain(b.iter().map(|t| (t.0.clone(), names[1].into())))
        .collect();
    let index = serde_json::json!({"metadata": {}, "weight_map": map}).to_string();
    std::fs::write(dir.join("model.safetensors.index.json"), &index).unwrap();
    let sharded = load::Checkpoint::open(dir, &config).unwrap();
    for (name, info, _) in &all {
        if info.dtype == safetensors::StDtype::F8E4M3 {
            continue;
        }
        assert_eq!(
            sharded.read(name, &info.shape).unwrap(),
            single.read(name, &info.shape).unwrap(),
            "{name}"
        );
    }
    // a shape the config does not imply
    let (n0, i0, _) = &all[0];
    let wrong: Vec<usize> = i0.shape.iter().map(|d| d + 1).collect();
    let e = sharded.read(n0, &wrong).unwrap_err().to_string();
    assert!(e.contains("config.json implies"), "{e}");
    // the index names a tensor its shard lacks
    let bad = index.replace(
        &format!("\"{}\":\"{}\"", b[0].0, names[1]),
        &format!("\"{}\":\"{}\"", b[0].0, names[0]),
    );
    assert_ne!(bad, index);
    std::fs::write(dir.join("model.safetensors.index.json"), &bad).unwrap();
    let e = load::Checkpoint::open(dir, &config).unwrap_err();
    assert!(e.to_string().contains("is not in this shard"), "{e}");
    std::fs::write(dir.join("model.safetensors.index.json"), &index).unwrap();
    // a missing shard
    std::fs::remove_file(dir.join(names[1])).unwrap();
    let e = load::Checkpoint::open(dir, &config).unwrap_err();
    assert_eq!(e.exit_code(), EXIT_BAD_INPUT);
    assert!(
        e.to_string().contains(names[1]) && e.to_string().contains("missing"),
        "{e}"
    );
}

/// The FP8 fixture's weights dequantise to what its reference was computed from: its f32 run
/// equals the bf16 fixture's to the tolerance of the FP8 rounding (and both load).
#[test]
fn fp8_weights_are_dequantised_with_their_block_scales() {
    let dir = fixture_dir("v3-fp8-tiny");
    let config = read_config_file(&dir.join("config.json")).unwrap();
    assert_eq!(config.quantization.map(|q| q.block), Some([128, 128]));
    let ck = load::Checkpoint::open(&dir, &config).unwrap();
    let name = "model.layers.0.self_attn.kv_b_proj.weight";
    let shape = [3 * (10 + 12), 24];
    let (w, bytes) = ck.read(name, &shape).unwrap();
    // one byte per weight plus one f32 scale (a single cropped 128 x 128 block)
    assert_eq!(bytes, (shape[0] * shape[1] + 4) as u64);
    let q = safetensors::SafeFile::open(&dir.join("model.safetensors")).unwrap();
    let raw = q.read_bytes(name).unwrap();
    let s = q.read_f32(&format!("{name}_scale_inv")).unwrap()[0];
    for (i, (&b, &x)) in raw.iter().zip(&w).enumerate() {
        assert_eq!(safetensors::e4m3_to_f32(b) * s, x, "element {i}");
    }
    // without quantization_config the FP8 tensor is refused
    let mut plain = config.clone();
    plain.quantization = None;
    let e = load::Checkpoint::open(&dir, &plain)
        .unwrap()
        .read(name, &shape)
        .unwrap_err();
    assert!(e.to_string().contains("no quantization_config"), "{e}");
}

/// `bench moe --model`: the model's MoE layers against dense FFNs of equal total and active
/// size, the dense-first layers unchanged in every variant, routing as config.json defines it.
#[test]
fn a_preset_gives_sc003_its_moe_layers_and_dense_first_layers() {
    use crate::config::{MoeVariant, Scenario, ScenarioKind};
    use crate::nn::moe::TopkMethod;
    let moe_of = |name: &str, layers: usize| {
        let mut s = Scenario::builtin(ScenarioKind::Moe);
        apply_model(
            &mut s,
            &resolve(name, Some(layers)).unwrap(),
            "sc003-moe.toml",
        )?;
        let Scenario::Moe(m) = s else { unreachable!() };
        Ok::<_, DsoptError>(m)
    };
    let m = moe_of("deepseek-v2-lite", 2).unwrap();
    assert!(crate::config::validate::validate(&Scenario::Moe(m.clone())).is_empty());
    let moe = m.decoder_config(MoeVariant::Moe);
    assert_eq!((moe.n_layers, moe.first_k_dense_replace), (2, 1));
    assert!(!moe.is_moe_layer(0) && moe.is_moe_layer(1));
    assert_eq!(moe.dense_ffn_hidden(0), 10944);
    let r = &moe.moe.as_ref().unwrap().router;
    assert_eq!((r.n_routed_experts, r.num_experts_per_tok), (64, 6));
    assert_eq!(
        (r.topk_method, r.norm_topk_prob),
        (TopkMethod::Greedy, false)
    );
    let total = m.decoder_config(MoeVariant::DenseEqualTotal);
    // layer 0 keeps the model's dense FFN; layer 1's is as wide as 64 + 2 experts
    assert_eq!(total.dense_ffn_hidden(0), 10944);
    assert_eq!(total.dense_ffn_hidden(1), 66 * 1408);
    // equal total size: the dense variant has the MoE's parameters less the router's
    assert_eq!(moe.params() - total.params(), 2048 * 64);
    let active = m.decoder_config(MoeVariant::DenseEqualActive);
    assert_eq!(active.dense_ffn_hidden(1), 8 * 1408);
    // V3: three dense layers first, noaux_tc with normalised weights scaled by 2.5
    let m = moe_of("deepseek-v3", 4).unwrap();
    let r = m.decoder_config(MoeVariant::Moe).moe.unwrap().router;
    assert_eq!(
        (r.topk_method, r.norm_topk_prob, r.route_scale),
        (TopkMethod::NoauxTc, true, 2.5)
    );
    assert_eq!((r.n_group, r.topk_group), (8, 4));
    // only dense layers left: exit 2 naming the fix
    let e = moe_of("deepseek-v3", 3).unwrap_err();
    assert_eq!(e.exit_code(), EXIT_BAD_INPUT);
    assert!(e.to_string().contains("--layers 4"), "{e}");
}

/// V3's MTP layer loads as dsopt's first MTP module and agrees with the reference's
/// `mtp_logits`; the same file with the two input halves of `eh_proj` exchanged (the order
/// dsopt's own modules use) does not.
#[test]
fn the_mtp_layer_loads_in_its_own_order_and_a_swapped_eh_proj_fails() {
    use burn::backend::Flex;
    let src = fixture_dir("v3-tiny");
    let config = read_config_file(&src.join("config.json")).unwrap();
    let reference = reference::Reference::read(&src.join("reference.safetensors")).unwrap();
    let mref = reference.mtp().expect("the fixture has mtp_logits");
    let (b, s) = reference.dims();
    let dc = config.decoder_config(crate::nn::MlaImpl::Absorbed);
    let dev = Default::default();
    let run = |dir: &std::path::Path| {
        let ck = load::Checkpoint::open(dir, &config).unwrap();
        let (main, _) =
            load::load_decoder::<Flex>(&ck, &dc, &dev, burn::tensor::DType::F32, true).unwrap();
        let mut report = load::LoadReport::default();
        let mtp = load::load_mtp::<Flex>(&ck, &dc, &dev, burn::tensor::DType::F32, &mut report)
            .unwrap()
            .expect("an MTP layer");
        let ids = reference.ids_tensor::<Flex>(&dev);
        let got = verify::mtp_forward(&main, mtp, crate::nn::MlaImpl::Absorbed, ids, b, s);
        reference::compare("mtp", &mref, &got, Dtype::F32)
    };
    let ok = run(&src);
    assert!(ok.pass && ok.max_abs_diff < 1e-5, "{ok:?}");
    // the same checkpoint with eh_proj's input halves exchanged in every row
    let file = safetensors::SafeFile::open(&src.join("model.safetensors")).unwrap();
    let name = format!("model.layers.{}.eh_proj.weight", config.num_hidden_layers);
    let all: Vec<_> = file
        .tensors()
        .iter()
        .map(|(n, i)| {
            let mut bytes = file.read_bytes(n).unwrap();
            if *n == name {
                let row = i.shape[1] * 2; // bf16
                for r in bytes.chunks_mut(row) {
                    let (a, b) = r.split_at_mut(row / 2);
                    a.swap_with_slice(b);
                }
            }
            (n.clone(), i.clone(), bytes)
        })
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
    write_safetensors(&tmp.path().join("model.safetensors"), &all);
    let swapped = run(tmp.path());
    assert!(!swapped.pass && swapped.max_abs_diff > 1e-2, "{swapped:?}");
}

/// The routing keys whose absent values take model-type defaults.
const ROUTING_KEYS: [&str; 6] = [
    "n_group",
    "topk_group",
    "norm_topk_prob",
    "routed_scaling_factor",
    "first_k_dense_replace",
    "n_shared_experts",
];

/// Keys a config.json leaves out take the defaults of transformers' config class for its
/// model_type (the reference implementation reads them so); V2 never routes with sigmoid there.
#[test]
fn absent_routing_keys_take_the_reference_classes_defaults() {
    let mut m = json("deepseek-v3");
    for k in ROUTING_KEYS {
        m.remove(k);
    }
    let c = parse_map(&m).unwrap();
    let moe = c.moe.unwrap();
    assert_eq!(
        (moe.n_group, moe.topk_group, moe.n_shared_experts),
        (8, 4, 1)
    );
    assert_eq!((moe.norm_topk_prob, moe.routed_scaling_factor), (true, 2.5));
    assert_eq!(c.first_k_dense_replace, 3);
    let mut m = json("deepseek-v2-lite");
    for k in ROUTING_KEYS {
        m.remove(k);
    }
    let c = parse_map(&m).unwrap();
    let moe = c.moe.unwrap();
    assert_eq!(
        (moe.n_group, moe.topk_group, moe.n_shared_experts),
        (1, 1, 2)
    );
    assert_eq!(
        (moe.norm_topk_prob, moe.routed_scaling_factor),
        (false, 1.0)
    );
    assert_eq!(c.first_k_dense_replace, 0);
    let mut m = json("deepseek-v2-lite");
    m.insert("scoring_func".into(), "sigmoid".into());
    assert!(bad_key(parse_map(&m)).contains("scoring_func"));
}

/// A reference whose logits hold a NaN is refused (a NaN would make every comparison pass).
#[test]
fn a_reference_with_nan_logits_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r.safetensors");
    let mut data = 3i64.to_le_bytes().to_vec();
    for x in [0.5f32, f32::NAN] {
        data.extend(x.to_le_bytes());
    }
    write_safetensors(
        &p,
        &[
            (
                "input_ids".into(),
                safetensors::TensorInfo {
                    dtype: safetensors::StDtype::I64,
                    shape: vec![1, 1],
                    start: 0,
                    end: 8,
                },
                data[..8].to_vec(),
            ),
            (
                "logits".into(),
                safetensors::TensorInfo {
                    dtype: safetensors::StDtype::F32,
                    shape: vec![1, 1, 2],
                    start: 0,
                    end: 8,
                },
                data[8..].to_vec(),
            ),
        ],
    );
    let e = reference::Reference::read(&p).unwrap_err();
    assert_eq!(e.exit_code(), EXIT_BAD_INPUT);
    assert!(e.to_string().contains("NaN"), "{e}");
}

/// verify's offloaded path (routed experts served from the host through a small LRU device
/// cache) agrees with transformers on the V3-style fixture, puts the experts back, and fails when
/// the store serves one expert's weights under another's index.
#[test]
fn the_offloaded_path_agrees_and_a_swapped_expert_fails_it() {
    use burn::backend::Flex;
    let src = fixture_dir("v3-tiny");
    let config = read_config_file(&src.join("config.json")).unwrap();
    let reference = reference::Reference::read(&src.join("reference.safetensors")).unwrap();
    let (b, s) = reference.dims();
    let dc = config.decoder_config(crate::nn::MlaImpl::Absorbed);
    let dev = Default::default();
    let ck = load::Checkpoint::open(&src, &config).unwrap();
    let (mut main, _) =
        load::load_decoder::<Flex>(&ck, &dc, &dev, burn::tensor::DType::F32, true).unwrap();
    let ids = reference.ids_tensor::<Flex>(&dev);
    let run = |m: &mut crate::nn::Decoder<Flex>, swap: bool| {
        let (name, got) = verify::offloaded_decode(m, ids.clone(), b, s, &dev, |host| {
            if swap {
                let layer = host.iter_mut().find(|l| l.len() > 1).unwrap();
                layer.swap(0, 1);
            }
        })
        .expect("the fixture has routed experts");
        (
            name,
            reference::compare("offloaded", &reference, &got, Dtype::F32),
        )
    };
    let (name, ok) = run(&mut main, false);
    assert!(ok.pass && ok.max_abs_diff < 1e-5, "{ok:?}");
    assert!(
        name.contains("evictions") && !name.contains(" 0 misses"),
        "{name}"
    );
    // the experts are back: the resident cached decode still agrees
    let again = verify::cached_decode(&main, ids.clone(), b, s);
    assert!(reference::compare("resident", &reference, &again, Dtype::F32).pass);
    let (_, bad) = run(&mut main, true);
    assert!(!bad.pass && bad.max_abs_diff > 1e-3, "{bad:?}");
}

/// Load timing against reading the same files, run by hand on a checkpoint folder
/// (`DSOPT_LOAD_DIR=DIR cargo test --release --lib -- --ignored load_timings --nocapture`):
/// not a test of speed, a measurement the note of issue 28 quotes. Three rounds, each a plain
/// sequential read of every file (1 MiB `read` calls, like `cat`) and then a load in the
/// checkpoint's dtype, interleaved so the two see the same page cache and machine phase.
#[test]
#[ignore]
fn load_timings() {
    use burn::backend::Flex;
    use std::io::Read;
    let Ok(dir) = std::env::var("DSOPT_LOAD_DIR") else {
        eprintln!("set DSOPT_LOAD_DIR to a checkpoint folder");
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let config = read_config_file(&dir.join("config.json")).unwrap();
    let dc = config.decoder_config(crate::nn::MlaImpl::Absorbed);
    let dtype = config.dtype.unwrap_or_default();
    let dev = Default::default();
    crate::backend::use_float_dtype::<Flex>(&dev, dtype).unwrap();
    let dtype = crate::backend::burn_dtype(dtype);
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    for round in 0..3 {
        let t = std::time::Instant::now();
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        for p in &files {
            let mut f = std::fs::File::open(p).unwrap();
            loop {
                let k = f.read(&mut buf).unwrap();
                if k == 0 {
                    break;
                }
                n += k as u64;
            }
        }
        let read_s = t.elapsed().as_secs_f64();
        let ck = load::Checkpoint::open(&dir, &config).unwrap();
        let (model, r) = load::load_decoder::<Flex>(&ck, &dc, &dev, dtype, true).unwrap();
        let t = std::time::Instant::now();
        drop(model);
        let drop_s = t.elapsed().as_secs_f64();
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let hwm = status
            .lines()
            .find(|l| l.starts_with("VmHWM"))
            .unwrap_or("");
        eprintln!(
            "round {round}: read {:.1} MB in {read_s:.3} s ({:.2} GB/s); load {} tensors, {:.1} MB \
             in {:.3} s ({:.2}x the read; drop {drop_s:.3} s); process {hwm}",
            n as f64 / 1e6,
            n as f64 / 1e9 / read_s,
            r.tensors,
            r.model_bytes as f64 / 1e6,
            r.seconds,
            r.seconds / read_s
        );
    }
}
