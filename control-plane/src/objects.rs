//! Objects that every replica of the control plane makes if they are missing (the
//! identity issuer, the trust roots, the webhook's certificate): the first create
//! wins, and a replica that loses the race (409 Conflict) uses the winner's.

use kube::Api;
use kube::api::PostParams;

/// Creates `object` (named `name`), or reads the one another replica created first.
/// `Ok((object, true))`: this call made it. `at` names the object in errors.
pub async fn create_or_get<K>(
    api: &Api<K>,
    name: &str,
    object: &K,
    at: &str,
) -> Result<(K, bool), String>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::Serialize + serde::de::DeserializeOwned,
{
    match api.create(&PostParams::default(), object).await {
        Ok(created) => Ok((created, true)),
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let winner = api
                .get(name)
                .await
                .map_err(|e| format!("cannot read {at}: {e}"))?;
            Ok((winner, false))
        }
        Err(e) => Err(format!("cannot create {at}: {e}")),
    }
}
