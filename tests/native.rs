//! The native API end to end, against the real binary.
mod common;
use common::{png_b64, Server};
use serde_json::{json, Value};

#[tokio::test]
async fn generate_returns_images_and_seeds() {
    let server = Server::start(&[], &[]);
    let client = reqwest::Client::new();
    let r = client
        .post(server.url("/v1/generate"))
        .json(&json!({
            "prompt": "a cat", "width": 64, "height": 64, "steps": 2, "seed": 7,
            "controls": [{"adapter": "canny", "image": png_b64(80, 60), "preprocessor": "canny"}]
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["seeds"], json!([7]));
    assert_eq!(body["images"].as_array().unwrap().len(), 1);
}
